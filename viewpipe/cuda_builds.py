"""Which DALI build fits this machine. DALI ships one wheel per CUDA major version (`nvidia-dali-cuda120`,
`nvidia-dali-cuda130`); viewpipe's extras `dali-cuda12` and `dali-cuda13` install one each, `dali` the CUDA 13
one. `dali_extra` names the extra for a torch build's CUDA version; `dali_mismatch` is the one-line error for a
DALI build that needs a newer driver than the machine has (DALI would fail later, deep inside a pipeline)."""

from __future__ import annotations

import ctypes
from importlib import metadata
from types import ModuleType

from viewpipe.errors import ViewpipeError, import_optional

DALI_BUILDS = {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}  # CUDA major → DALI's distribution
DEFAULT_CUDA = 13  # the `dali` extra's build


def cuda_major(version: str | None) -> int | None:
    """The major of a CUDA version string ("12.4" → 12); None for None, "" or a CPU build."""
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def dali_extra(torch_cuda: str | None) -> str:
    """The extra whose DALI build matches a torch built for CUDA `torch_cuda` (`torch.version.cuda`; None for a
    CPU build, which either build's CPU mode serves: the default one)."""
    major = cuda_major(torch_cuda)
    return f"dali-cuda{major if major in DALI_BUILDS else DEFAULT_CUDA}"


def installed_dali_cuda() -> int | None:
    """The CUDA major of the installed DALI build, None without one."""
    for major, dist in DALI_BUILDS.items():
        try:
            metadata.distribution(dist)
            return major
        except metadata.PackageNotFoundError:
            continue
    return None


def driver_cuda_version() -> int | None:
    """The newest CUDA version the installed driver supports, as the driver API writes it (12040 for 12.4);
    None without an NVIDIA driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


def dali_mismatch(dali_cuda: int | None, driver: int | None, torch_cuda: str | None) -> str | None:
    """The one-line error when DALI's build (CUDA major `dali_cuda`) needs a newer driver than `driver`
    (`driver_cuda_version`), naming the build to install instead; None when they fit or either is unknown."""
    if dali_cuda is None or driver is None or driver // 1000 >= dali_cuda:
        return None
    have = f"{driver // 1000}.{driver % 1000 // 10}"
    fits = [m for m in DALI_BUILDS if m <= driver // 1000]
    fix = (f"pip uninstall -y {DALI_BUILDS[dali_cuda]} && pip install 'viewpipe[dali-cuda{max(fits)}]'" if fits
           else "update the NVIDIA driver")
    return (f"NVIDIA DALI is installed for CUDA {dali_cuda} ({DALI_BUILDS[dali_cuda]}), but this machine's driver "
            f"supports CUDA {have} at most (torch is built for CUDA {torch_cuda or 'none: a CPU build'}): {fix}")


def import_dali(gpu: bool = False) -> ModuleType:
    """`nvidia.dali`; without it, one line naming the extra that fits this torch's CUDA; for a GPU pipeline
    (`gpu`), also one line when the installed build needs a newer driver than the machine's."""
    import torch

    dali = import_optional("nvidia.dali", dali_extra(torch.version.cuda), "NVIDIA DALI")
    if gpu and (problem := dali_mismatch(installed_dali_cuda(), driver_cuda_version(), torch.version.cuda)):
        raise ViewpipeError(problem)
    return dali
