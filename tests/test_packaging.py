"""The layout the user fixed: pipelines/, trainers/, tools/ install inside the viewpipe namespace,
in a normal (wheel) install as in the editable one, and the core imports neither DALI nor FFCV."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, run_python


def fresh_venv(root: Path) -> Path:
    """A new virtual environment without viewpipe, its dependencies borrowed from this one's site-packages
    (a path in a .pth file: this environment's own .pth files, the editable install's finder among them, are
    not run), so that `pip install .` needs no network. Returns its python."""
    import site
    import venv

    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_pip_install_into_a_fresh_venv_runs_a_shipped_config_and_the_five_line_loader(tmp_path: Path,
                                                                                     image_folder: Path) -> None:
    """`pip install .` (no -e) into a new venv, away from the repository and ../shared: the wheel holds the
    namespaced packages, the configs and py.typed; `viewpipe pretrain --config mocov2_ccrop_cifar10` runs with
    the two data keys given, and the README's five-line loader runs as written."""
    from viewpipe.synthetic import make_folder

    python = fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(REPO)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "work"
    make_folder(work / "data" / "train", n=16, size_range=(40, 64), seed=3)
    test_set = make_folder(tmp_path / "test", n=24, size_range=(40, 64), seed=4)
    env = {**os.environ, "PYTHONPATH": ""}
    run = lambda *args, **kw: subprocess.run([str(python), *args], cwd=work, capture_output=True, text=True,  # noqa
                                             env=env, timeout=240, **kw)
    res = run("-c", "import viewpipe, viewpipe.tools.cli, importlib.resources as r; print(viewpipe.__file__); "
                    "print(r.files('viewpipe').joinpath('py.typed').is_file())")
    assert res.returncode == 0, res.stderr
    where, typed = res.stdout.split()
    assert where.startswith(str(tmp_path / "venv")) and typed == "True"
    res = run("-m", "viewpipe.tools", "pretrain", "--config", "mocov2_ccrop_cifar10", f"data.path={image_folder}",
              f"data.test_path={test_set}", "data.backend=torch", "backbone=resnet_tiny", "device=cpu", "epochs=1",
              "max_steps=2", "data.batch_size=8", "data.workers=1", "ccrop.enabled=false", "method_args={queue:64}",
              "out=run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "run" / "config.yaml").is_file() and (work / "run" / "last.pt").is_file()
    readme = (REPO / "README.md").read_text()
    five = readme.split("From Python, a loader is five lines")[1].split("```python\n")[1].split("```")[0]
    assert len(five.strip().splitlines()) == 5
    res = run("-c", five + "print(tuple(batch.views[0].shape))")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "(16, 3, 32, 32)"
    res = run("-m", "viewpipe.tools", "pretrain", "--config", "mocov2_ccrop_cifar10", f"data.path={image_folder}")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].endswith(
        "data.test_path is not set; add data.test_path=... to the command line (the config's comments say what "
        "it takes)"), res.stderr


def test_wheel_has_only_the_viewpipe_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("viewpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("viewpipe", "viewpipe/pipelines", "viewpipe/trainers", "viewpipe/tools"):
        assert f"{pkg}/__init__.py" in names
    assert "viewpipe/pipelines/reference.py" in names and "viewpipe/tools/cli.py" in names
    assert "viewpipe/configs/mocov2_ccrop_cifar10.yaml" in names and "viewpipe/py.typed" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"viewpipe"}, f"no generic top-level modules in a user's environment: {tops}"


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
