"""The layout the user fixed: pipelines/, trainers/, tools/ install inside the viewpipe namespace,
in a normal (wheel) install as in the editable one, and the core imports neither DALI nor FFCV."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO, run_python


def test_wheel_installs_namespaced_packages(tmp_path, image_folder) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("viewpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("viewpipe", "viewpipe/pipelines", "viewpipe/trainers", "viewpipe/tools"):
        assert f"{pkg}/__init__.py" in names
    assert "viewpipe/pipelines/reference.py" in names and "viewpipe/tools/cli.py" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"viewpipe"}, f"no generic top-level modules in a user's environment: {tops}"
    # installed (not editable) into a separate folder, it imports from there
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    res = run_python(
        f"""
        import sys; sys.path.insert(0, {str(target)!r})
        import viewpipe.pipelines.reference, viewpipe.tools.cli, viewpipe.trainers
        print(viewpipe.pipelines.reference.__file__)
        """,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(target))
    # the shipped configs are package data: `viewpipe pretrain --config NAME` runs from the wheel, away from the repo
    assert "viewpipe/configs/mocov2_ccrop_cifar10.yaml" in names
    res = run_python(
        f"""
        import sys; sys.path.insert(0, {str(target)!r})
        from viewpipe.trainers.config import find_config
        from viewpipe.tools.cli import main
        print(find_config("mocov2_ccrop_cifar10"))
        code = main(["pretrain", "--config", "mocov2_ccrop_cifar10", "data.path={image_folder}", "data.test_path=", "data.backend=torch",
                     "backbone=resnet_tiny", "device=cpu", "epochs=1", "max_steps=1", "data.batch_size=8",
                     "data.workers=1", "knn_every=0", "ccrop.enabled=false", "method_args={{queue:64}}",
                     "out={tmp_path / 'run'}"])
        print("exit", code)
        """,
        cwd=tmp_path, timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == str(target / "viewpipe" / "configs" / "mocov2_ccrop_cifar10.yaml") and lines[-1] == "exit 0"
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "last.pt").is_file()


def test_editable_install_maps_packages() -> None:
    res = run_python("import viewpipe.pipelines, viewpipe.tools; print(viewpipe.pipelines.__file__)", cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(REPO / "pipelines" / "__init__.py")


def test_core_imports_neither_dali_nor_ffcv() -> None:
    res = run_python(
        """
        import sys
        import viewpipe, viewpipe.state, viewpipe.crop, viewpipe.boxes, viewpipe.augment, viewpipe.sources
        import viewpipe.pipelines.reference, viewpipe.tools.cli
        bad = [m for m in sys.modules if m.split(".")[0] in ("nvidia", "ffcv")]
        print(bad)
        """,
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
