"""Shared helpers for the tests."""
import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import rgkern
from rgkern import cli
from rgkern.tools.presets import make_config
from rgkern.tools.train import build_model, load_images
from rgkern.tools.trainer import Trainer


def tiny_model(L=8, C=1, k=4, dtype=torch.float64, seed=0, scale_std=0.5, **kwargs):
    """A small RGFlow whose couplings are NOT the identity.

    The learned output scales of s and t start at zero (every coupling is the identity at
    initialisation); tests that compare paths must not run on that, so they are randomised.
    """
    # PyTorch's initialisation for both variants: with the authors' (3x wider weights, zero
    # biases) and randomised output scales, latents reach 1e4 and the round trip loses
    # digits to conditioning, not to a bug; the initialisation itself is tested on its own.
    config = dict(n_layers=1, hidden=8, n_res=1, n_mlp=1, backend="torch", init="torch")
    config.update(kwargs)
    torch.manual_seed(seed)
    model = rgkern.RGFlow(image_size=L, channels=C, kernel_size=k, **config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("s_scale") or name.endswith("t_scale"):
                param.normal_(0, scale_std)
    return model


def random_authors_model(L=16, C=3, k=4, dtype=torch.float64, **kwargs):
    """A variant="authors" model whose slopes, magnitudes and biases are off their initial values too."""
    settings = dict(n_layers=(2, 1, 1), hidden=8, n_res=2, n_mlp=1, variant="authors")
    settings.update(kwargs)
    model = tiny_model(L, C, k, dtype=dtype, **settings)
    with torch.no_grad():  # non-trivial slopes, magnitudes and biases too
        g = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if "slopes" in name or "magnitudes" in name or "biases" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)).add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def random_images(model, batch=3, seed=1, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    L, C = model.image_size, model.channels
    dtype = next(model.parameters()).dtype
    return scale * torch.randn(batch, C, L, L, generator=g, dtype=torch.float64).to(dtype)


def random_scales(model, generator: torch.Generator) -> None:
    """Randomise the zero-initialised s/t output scales so the couplings are not the identity."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("s_scale") or name.endswith("t_scale"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype))



# ----------------------------------------------------------------------------- training: tiny runs on MSDS1
# Shared by tests/test_train.py and tests/test_train_options.py, each with its own image counts.
def quiet(_line):
    """A ``log`` function that prints nothing."""


def msds_images(train_size, test_size):
    """``(train images, test images)``: the first ``train_size`` / ``test_size`` of MSDS1's splits."""
    return load_images("msds1", split="train", size=train_size, progress=False), load_images("msds1", split="test", size=test_size, progress=False)


def tiny_config(**overrides):
    """The hidden 'tiny' preset on the CPU, batch 16, with ``overrides`` (train_size and test_size among them)."""
    settings = dict(batch_size=16, device="cpu")
    settings.update(overrides)
    return make_config("tiny", **settings)


def trainer(config, images, out):
    """A :class:`Trainer` of a fresh model for ``config``, on the first ``config.train_size`` / ``config.test_size`` images."""
    train_images, test_images = images
    model = build_model(config, image_size=32, channels=3)
    return Trainer(model, train_images[: config.train_size], test_images[: config.test_size], config, out, log=quiet)


def assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key

# ----------------------------------------------------------------------------- reliability: the CLI in-process, files, kills
# Shared by the tests/test_reliability_*.py files; their fixtures (the run folder, the trained
# model, an image folder, a small tmpfs disk) are in conftest.py.
REPO = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--preset", "tiny", "--device", "cpu", "--no-progress", "--num-samples", "4"]


def run(args, capsys):
    """``(exit code, stdout, stderr)`` of ``rgkern ARGS`` in-process (argparse's SystemExit included)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(result, command, *fragments):
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rgkern {command}: error: " if command else "rgkern: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def dot_files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def fill(disk: Path) -> None:
    """Fill the file system of ``disk`` to the last byte."""
    with open(disk / "filler", "wb", buffering=0) as handle:
        for size in (65536, 4096, 1):  # down to the last partial block
            try:
                while handle.write(b"\0" * size):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC


# A subprocess that runs ``rgkern ARGS`` and stops in the middle of a write, printing "ready"
# to stdout, so the test can kill it with SIGKILL exactly there.
PAUSING_CLI = r"""
import os, sys, time
mode, argv = sys.argv[1], sys.argv[2:]

def pause():
    print("ready", flush=True)
    time.sleep(600)

if mode == "checkpoint-half-written":
    import safetensors.torch as st
    real_save = st.save_file
    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        pause()
    st.save_file = save_file
elif mode == "between-renames":
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if str(dst).endswith("model.safetensors"):
            pause()
    os.replace = replace
elif mode == "npz-half-written":
    from rgkern.tools import sampling
    real_write = sampling._NpyStream.write
    def write(self, batch):
        real_write(self, batch)
        if self.written >= 8:
            pause()
    sampling._NpyStream.write = write
elif mode == "hold-lock":
    from rgkern.tools.files import run_lock
    with run_lock(argv[0]):
        pause()
from rgkern.cli import main
sys.exit(main(argv))
"""


def start_paused(mode, args):
    """Start ``rgkern ARGS`` in a subprocess that pauses at ``mode``; returns it once it is there."""
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, mode, *[str(a) for a in args]],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            if line.strip() == "ready":
                return process
            if line == "" and process.poll() is not None:
                break
    process.kill()
    raise AssertionError(f"the subprocess did not reach {mode!r}: {process.communicate()[1][-2000:]}")


def kill(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
