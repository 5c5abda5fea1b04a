"""Test set-up: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The tests run tiny models: one thread avoids OpenMP's spin-waiting overhead, which makes
# such models many times slower on a 2-core machine with anything else running.
torch.set_num_threads(1)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """The device the kernel path is tested on: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
