"""Test set-up: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

HAS_CUDA = torch.cuda.is_available()

# The tests run tiny models: one thread avoids OpenMP's spin-waiting overhead, which makes
# such models many times slower on a 2-core machine with anything else running.
torch.set_num_threads(1)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# rgkern (and Triton through it) only once TRITON_INTERPRET is set.
import rgkern.tools.checkpoint  # noqa: E402
from rgkern import cli  # noqa: E402
from rgkern.tools.train import CHECKPOINT_NAME  # noqa: E402

from utils import TRAIN  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device the kernel path is tested on: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


# ----------------------------------------------------------------------------- reliability fixtures
# Used by the tests/test_reliability_*.py files (a file's own fixture of the same name, as
# tests/test_cli.py's run_folder, takes precedence there). The training run, the model loaded
# from it and the image folder are built once per session, not once per file: no test writes
# to them (a test that changes the run works on run_copy, a copy of its own).
@pytest.fixture(scope="session")
def run_folder(tmp_path_factory):
    """One CLI run of the 'tiny' preset (4 steps, checkpoint at step 4), shared by the session."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert cli.main(TRAIN + ["--out", str(out), "--steps", "4"]) == 0
    return out


@pytest.fixture
def run_copy(run_folder, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    return copy


@pytest.fixture(scope="session")
def trained(run_folder):
    return rgkern.tools.checkpoint.load_model(run_folder / CHECKPOINT_NAME)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """An image-folder dataset: 8 random 32x32 RGB PNGs in train/ and in test/."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test (needs root and a kernel that allows it), else skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(result.stderr or result.stdout).strip() or 'mount failed'}): full and read-only disks untested")
    try:
        yield mount
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
