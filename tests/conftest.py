"""Shared fixtures: small generated data (tests never need ../shared) and subprocess helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, **kw
    )


def start_python(code: str, **kw) -> subprocess.Popen:
    """Start Python code in a fresh interpreter, stdout as a line-buffered pipe."""
    return subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )


@pytest.fixture
def state_name() -> str:
    """A unique sample-state name for one test."""
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated ImageNet-style folder (varied sizes, 12 classes, true boxes in boxes.npy)."""
    from viewpipe.synthetic import make_folder

    return make_folder(tmp_path_factory.mktemp("images"), n=96, size_range=(40, 96), seed=1)
