"""The DALI build for this machine: the extra named from torch's CUDA version, and one line when the installed
build needs a newer driver (checked against fake version strings: no GPU needed)."""

from __future__ import annotations

import pytest

from viewpipe import cuda_builds
from viewpipe.cuda_builds import cuda_major, dali_extra, dali_mismatch
from viewpipe.errors import ViewpipeError


@pytest.mark.parametrize("torch_cuda,extra", [
    ("12.1", "dali-cuda12"), ("12.8", "dali-cuda12"), ("13.0", "dali-cuda13"), ("13.2", "dali-cuda13"),
    (None, "dali-cuda13"), ("", "dali-cuda13"), ("11.8", "dali-cuda13"), ("rocm", "dali-cuda13"),
])
def test_the_extra_follows_torch_s_cuda(torch_cuda: str | None, extra: str) -> None:
    assert dali_extra(torch_cuda) == extra


def test_cuda_major() -> None:
    assert [cuda_major(v) for v in ("12.4", "13", None, "", "x.y")] == [12, 13, None, None, None]


def test_a_build_newer_than_the_driver_is_one_line_naming_the_fit() -> None:
    msg = dali_mismatch(13, 12040, "12.4")
    assert msg == ("NVIDIA DALI is installed for CUDA 13 (nvidia-dali-cuda130), but this machine's driver supports "
                   "CUDA 12.4 at most (torch is built for CUDA 12.4): pip uninstall -y nvidia-dali-cuda130 && "
                   "pip install 'viewpipe[dali-cuda12]'")
    assert dali_mismatch(13, 11080, None).endswith("(torch is built for CUDA none: a CPU build): update the NVIDIA "
                                                   "driver")
    assert dali_mismatch(13, 13000, "13.0") is None and dali_mismatch(12, 13010, "13.0") is None  # fits
    assert dali_mismatch(None, 12040, "12.4") is None and dali_mismatch(13, None, "12.4") is None  # unknown


def test_import_dali_raises_the_mismatch_on_a_gpu_pipeline_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_builds, "installed_dali_cuda", lambda: 13)
    monkeypatch.setattr(cuda_builds, "driver_cuda_version", lambda: 12020)
    assert cuda_builds.import_dali().__name__ == "nvidia.dali"  # a CPU pipeline: any build serves
    with pytest.raises(ViewpipeError, match=r"supports CUDA 12\.2 at most"):
        cuda_builds.import_dali(gpu=True)


def test_a_missing_dali_names_the_extra_for_this_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import torch

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(ViewpipeError, match=r"pip install 'viewpipe\[dali-cuda12\]'"):
        cuda_builds.import_dali()


def test_the_installed_build_is_read_from_its_distribution() -> None:
    assert cuda_builds.installed_dali_cuda() == 13  # the dev environment installs viewpipe[dali]
