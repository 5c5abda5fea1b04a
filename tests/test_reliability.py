"""Reliability (issue 16): no traceback for a user's mistake, no silent NaN, no lost file, no two runs in one folder.

Every case asserts its outcome: exit code 2 with one line ``rgkern <command>: error: ...``
on stderr and no traceback; or a correct result; or the previous file intact. Kills are
real (``SIGKILL`` of a subprocess paused inside a write); a full or read-only disk is a
small tmpfs where this machine lets the test mount one (root), and is skipped otherwise.
One tiny training run (the hidden ``tiny`` preset) serves the whole module; commands run
in-process through :func:`rgkern.cli.main` except where a second process is the point.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rgkern
from rgkern import cli
from rgkern.core.errors import InputError
from rgkern.tools.checkpoint import CheckpointError, load_checkpoint, read_document, repair_sidecar, save_checkpoint
from rgkern.tools.files import LOCK_NAME, RunFolderBusyError, atomic_write, remove_orphans, run_lock
from rgkern.tools.plots import plot_history, save_image_grid
from rgkern.tools.presets import make_config
from rgkern.tools.sampling import NonFiniteSampleError, sample_images, write_samples
from rgkern.tools.train import CHECKPOINT_NAME, build_model, train

from utils import random_images, tiny_model

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--preset", "tiny", "--device", "cpu", "--no-progress", "--num-samples", "4"]


# ----------------------------------------------------------------------------- helpers and fixtures
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


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """One CLI run of the 'tiny' preset (4 steps, checkpoint at step 4), shared by the module."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert cli.main(TRAIN + ["--out", str(out), "--steps", "4"]) == 0
    return out


@pytest.fixture
def run_copy(run_folder, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    return copy


@pytest.fixture(scope="module")
def trained(run_folder):
    return rgkern.tools.checkpoint.load_model(run_folder / CHECKPOINT_NAME)


@pytest.fixture(scope="module")
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


# ----------------------------------------------------------------------------- 1. bad command lines
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def checkpoint_args(run):
    return ["--checkpoint", run]


BAD_ARGUMENTS = [
    # (id, command line with RUN for the run folder and OUT for a fresh folder, command, fragments)
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--device", "cuda"], "train", ["--device", "CUDA is not available"], marks=NO_CUDA, id="train-cuda"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--device", "cuda:0"], "sample", ["CUDA is not available"], marks=NO_CUDA, id="sample-cuda0"),
    pytest.param(["evaluate", "--checkpoint", "RUN", "--device", "mps"], "evaluate", ["'mps' is not supported"], id="evaluate-mps"),
    pytest.param(["inpaint", "--checkpoint", "RUN", "--out", "OUT", "--device", "nonsense"], "inpaint", ["unknown device 'nonsense'"], id="inpaint-nonsense"),
    pytest.param(["receptive-fields", "--checkpoint", "RUN", "--out", "OUT/rf.png", "--device", "meta"], "receptive-fields", ["'meta' is not supported"], id="explain-meta"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--device", "cpu:3"], "train", ["no index"], id="train-cpu3"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--threads", "100000"], "train", ["--threads", "threads in 1 .."], id="threads-huge"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--threads", "0"], "sample", ["threads in 1 .."], id="threads-zero"),
    pytest.param(["evaluate", "--checkpoint", "RUN", "--threads", "many"], "evaluate", ["'many'"], id="threads-text"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--scale", "100000"], "sample", ["scale 100000", "8192 x 8192", "use scale"], id="scale-huge"),
    pytest.param(["traverse", "--checkpoint", "RUN", "--out", "OUT/t.png", "--scale", "100000"], "traverse", ["8192 x 8192"], id="traverse-scale-huge"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--seed", "99999999999999999999999"], "sample", ["--seed", "0 .. 2**63 - 1"], id="seed-huge"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--seed", "-1"], "train", ["--seed"], id="seed-negative"),
    pytest.param(["inpaint", "--checkpoint", "RUN", "--out", "OUT", "--seed", str(2**64)], "inpaint", ["--seed"], id="inpaint-seed"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--temperature", "1e38"], "sample", ["<= 10000"], id="temperature-1e38"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--temperature", "nan"], "sample", ["finite"], id="temperature-nan"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--temperature", "hot"], "sample", ["comma-separated"], id="temperature-text"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--temperature", "1,1e30,1,1"], "sample", ["<= 10000"], id="temperature-level-huge"),
    pytest.param(["traverse", "--checkpoint", "RUN", "--out", "OUT/t.png", "--temperature", "1e30"], "traverse", ["<= 10000"], id="traverse-temperature"),
    pytest.param(["mix-temperature", "--checkpoint", "RUN", "--out", "OUT/m.png", "--setting", "warm"], "mix-temperature", ["--setting", "'warm'"], id="setting-text"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--num", "0"], "sample", ["--num", "positive integer"], id="num-zero"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.png", "--batch-size", "-3"], "sample", ["--batch-size"], id="batch-negative"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.txt"], "sample", ["--out takes"], id="out-suffix"),
    pytest.param(["sample", "--checkpoint", "RUN"], "sample", ["--out"], id="out-missing"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--steps", "0"], "train", ["--steps"], id="steps-zero"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--lr", "nan"], "train", ["lr must be a finite number"], id="lr-nan"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--time-limit", "-1"], "train", ["--time-limit"], id="time-limit"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--resume", "--overwrite"], "train", ["not allowed with"], id="resume-and-overwrite"),
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--bogus"], "train", ["unrecognized arguments: --bogus"], id="unknown-option"),
    pytest.param(["train", "--preset", "huge", "--out", "OUT"], "train", ["unknown preset 'huge'"], id="unknown-preset"),
    pytest.param(["evaluate", "--checkpoint", "RUN", "--split", "val"], "evaluate", ["invalid choice: 'val'"], id="split"),
    pytest.param(["inpaint", "--checkpoint", "RUN", "--out", "OUT", "--steps", "-1"], "inpaint", ["--steps"], id="inpaint-steps"),
    pytest.param(["inpaint", "--checkpoint", "RUN", "--out", "OUT", "--region-size", "1000"], "inpaint", ["region size"], id="region-size"),
    pytest.param(["inpaint", "--checkpoint", "RUN", "--out", "OUT", "--lr", "inf"], "inpaint", ["lr must be a positive float"], id="inpaint-lr"),
    pytest.param(["traverse", "--checkpoint", "RUN", "--out", "OUT/t.png", "--level", "99"], "traverse", ["99"], id="traverse-level"),
    pytest.param(["traverse", "--checkpoint", "RUN", "--out", "OUT/t.png", "--channel", "9"], "traverse", ["9"], id="traverse-channel"),
    pytest.param(["scale-mix", "--checkpoint", "RUN", "--out", "OUT/m.png", "--cut", "99"], "scale-mix", ["99"], id="scale-mix-cut"),
    pytest.param(["receptive-fields", "--checkpoint", "RUN", "--out", "OUT/r.png", "--hist-per-level", "-5"], "receptive-fields", ["--hist-per-level"], id="hist-per-level"),
    pytest.param(["sample", "--checkpoint", "RUN", "--out", "OUT/s.npz", "--num", str(10**11), "--batch-size", str(10**11), "--no-progress"], "sample", ["out of memory", "--batch-size"], id="out-of-memory"),
    pytest.param(["nocommand"], None, ["invalid choice: 'nocommand'"], id="unknown-command"),
    pytest.param([], None, ["a command is required", "train"], id="no-command"),
]


@pytest.mark.parametrize("argv, command, fragments", BAD_ARGUMENTS)
def test_a_bad_command_line_is_one_line_with_exit_code_2(argv, command, fragments, run_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [str(out) + a[3:] if a.startswith("OUT") else str(run_folder) if a == "RUN" else a for a in argv]
    before = contents(run_folder)
    assert_one_line_error(run(argv, capsys), command, *fragments)
    assert contents(run_folder) == before
    if out.exists():  # nothing written where the command was to write
        assert [p.name for p in out.rglob("*") if p.is_file()] == []


def test_inpaint_backend_triton_on_a_cpu_machine(run_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine without the interpreter asked for
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run(["inpaint", "--checkpoint", run_folder, "--out", tmp_path / "o", "--backend", "triton", "--device", "cpu"], capsys)
    assert_one_line_error(result, "inpaint", "backend 'triton' needs a CUDA device")


def test_argparse_errors_print_no_usage_block(capsys):
    _, out, err = run(["sample", "--num", "x", "--checkpoint", "c", "--out", "o.png"], capsys)
    assert "usage:" not in err and out == ""
    assert err.startswith("rgkern sample: error: argument --num: expected a positive integer, got 'x'")


# ----------------------------------------------------------------------------- 2. corrupt and foreign checkpoints
def _rewrite(source: Path, target: Path, document=None, tensors=None, table=None, drop=()):
    """Copy a checkpoint, changing its document / tensors / checksum table with the given functions."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        values = {k: handle.get_tensor(k) for k in handle.keys()}
    if document is not None:
        metadata["rgkern"] = document(json.loads(metadata["rgkern"]))
        if not isinstance(metadata["rgkern"], str):
            metadata["rgkern"] = json.dumps(metadata["rgkern"])
    if tensors is not None:
        values = tensors(values)
    if table is not None:
        metadata["rgkern.sha256"] = json.dumps(table(json.loads(metadata["rgkern.sha256"])))
    for key in drop:
        metadata.pop(key, None)
    save_file(values, str(target), metadata=metadata)
    return target


def _flip_a_tensor_byte(source, target, name="model.sublayers.0.networks.directions.0"):
    """Copy ``source`` with one bit flipped in the middle of tensor ``name``'s data."""
    data = bytearray(source.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_size])[name]["data_offsets"]
    data[8 + header_size + (begin + end) // 2] ^= 0x10
    target.write_bytes(bytes(data))


def _with_nan(values):
    values = dict(values)
    name = next(k for k in values if k.startswith("model.") and k.endswith("directions.0"))
    values[name] = values[name].clone()
    values[name][0, 0, 0, 0, :3] = float("nan")
    return values


def _foreign_model_tensors(source, target):
    """Tensors of another architecture (n_layers 2) under the checkpoint's own config, checksums consistent."""
    other = build_model(make_config("tiny", model={"n_layers": 2}), 32, 3)
    save_checkpoint(target, other)
    config = read_document(source)["config"]
    _rewrite(target, target.with_name("tmp.safetensors"), document=lambda d: {**d, "config": config})
    os.replace(target.with_name("tmp.safetensors"), target)


def _extra_tensor(source, target):
    model = rgkern.tools.checkpoint.load_model(source)
    model.register_buffer("extra_weight", torch.ones(3))
    save_checkpoint(target, model)


BAD_FILES = {
    "missing": (lambda s, t: None, "does not exist"),
    "folder-named-like-it": (lambda s, t: t.mkdir(), "is a folder"),
    "empty": (lambda s, t: t.write_bytes(b""), "only 0 bytes"),
    "random-bytes": (lambda s, t: t.write_bytes(np.random.default_rng(0).bytes(4096)), "not a safetensors file"),
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "corrupt"),
    "a-png": (lambda s, t: shutil.copy(s.parent / "samples.png", t), "not a safetensors file"),
    "a-torch-pickle": (lambda s, t: torch.save({"w": torch.ones(3)}, t), "not a safetensors file"),
    "plain-safetensors": (lambda s, t: __import__("safetensors.torch").torch.save_file({"w": torch.ones(3)}, str(t)), "not an rgkern checkpoint"),
    "metadata-not-json": (lambda s, t: _rewrite(s, t, document=lambda d: "{broken"), "not JSON"),
    "no-config": (lambda s, t: _rewrite(s, t, document=lambda d: {k: v for k, v in d.items() if k != "config"}), "no model config"),
    "future-format": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "format": 99}), "format 99"),
    "flipped-byte": (_flip_a_tensor_byte, "checksum mismatch"),
    "tensor-removed": (lambda s, t: _rewrite(s, t, tensors=lambda v: {k: x for k, x in v.items() if not k.endswith("s_scale")}), "tensors missing"),
    "checksum-table-edited": (lambda s, t: _rewrite(s, t, table=lambda tab: {**tab, next(iter(tab)): "0" * 64}), "checksum table does not match"),
    "nan-weights-old-format": (lambda s, t: _rewrite(s, t, tensors=_with_nan, drop=("rgkern.sha256",)), "non-finite weights"),
    "other-architecture": (_foreign_model_tensors, "tensors of other shapes"),
    "extra-tensor": (_extra_tensor, "extra_weight"),
    "invalid-config": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "image_size": 33}}), "invalid model config"),
    "unknown-setting": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "warp_drive": 1}}), "cannot build"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_checkpoint_file_is_refused_with_a_clear_line(kind, run_folder, tmp_path, capsys):
    make, fragment = BAD_FILES[kind]
    target = tmp_path / "model.safetensors"
    make(run_folder / CHECKPOINT_NAME, target)
    before = target.read_bytes() if target.is_file() else None
    assert_one_line_error(run(["evaluate", "--checkpoint", target, "--no-progress"], capsys), "evaluate", fragment, str(target))
    if before is not None:
        assert target.read_bytes() == before  # left alone


@pytest.mark.parametrize("command", ["sample", "inpaint", "receptive-fields", "evaluate"])
def test_every_command_refuses_a_flipped_byte(command, run_folder, tmp_path, capsys):
    target = tmp_path / "model.safetensors"
    _flip_a_tensor_byte(run_folder / CHECKPOINT_NAME, target)
    args = [command, "--checkpoint", tmp_path, "--no-progress"]
    args += {"sample": ["--out", tmp_path / "s.png"], "inpaint": ["--out", tmp_path / "o"], "receptive-fields": ["--out", tmp_path / "r.png"]}.get(command, [])
    line = assert_one_line_error(run(args, capsys), command, "checksum mismatch")
    assert "model.sublayers.0.networks.directions.0" in line  # names the damaged tensor
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "change, setting",
    [({"hidden": 16, "n_mlp": 1}, "hidden"), ({"n_layers": 2}, "n_layers"), ({"n_mlp": 1}, "n_mlp")],
    ids=["hidden", "more-layers", "n_mlp"],
)
def test_a_checkpoint_of_another_architecture_names_what_differs(change, setting, run_folder):
    other = build_model(make_config("tiny", model=change), 32, 3)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(run_folder / CHECKPOINT_NAME, other)
    message = str(error.value)
    assert "different model config" in message and f"'{setting}'" in message and "tensors of other shapes" in message


def test_a_checkpoint_of_other_channels_names_channels(run_folder):
    with pytest.raises(CheckpointError, match=r"'channels': \(3, 1\)"):
        load_checkpoint(run_folder / CHECKPOINT_NAME, build_model(make_config("tiny"), 32, 1))


def test_resume_from_another_architecture_is_one_line(run_copy, capsys):
    other = build_model(make_config("tiny", model={"n_layers": 2}), 32, 3)
    save_checkpoint(run_copy / CHECKPOINT_NAME, other, step=4)
    line = assert_one_line_error(run(TRAIN + ["--out", run_copy, "--steps", "8", "--resume"], capsys), "train", "n_layers")
    assert "different model config" in line


def test_checkpoints_from_before_checksums_still_load(run_folder, tmp_path, trained):
    old = _rewrite(run_folder / CHECKPOINT_NAME, tmp_path / "old.safetensors", document=lambda d: {k: v for k, v in d.items() if k != "tensors_sha256"}, drop=("rgkern.sha256",))
    state = load_checkpoint(old)
    assert state["verified"] is False and state["step"] == 4
    for (name, a), b in zip(state["model"].state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(run_folder / CHECKPOINT_NAME)["verified"] is True


def test_saving_non_finite_weights_is_refused(trained, tmp_path):
    model = build_model(make_config("tiny"), 32, 3)
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        model.sublayers[0].networks.s_scale[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN or inf.*sublayers\.0\.networks\.s_scale"):
        save_checkpoint(tmp_path / "m.safetensors", model)
    assert list(tmp_path.iterdir()) == []


def test_loading_onto_a_device_this_machine_lacks(run_folder):
    for device, message in (("meta", "meta"), ("nonsense", "unknown device")):
        with pytest.raises(ValueError, match=message):
            load_checkpoint(run_folder / CHECKPOINT_NAME, map_location=device)


# ----------------------------------------------------------------------------- 3. kill -9 during writes
def test_kill_while_the_checkpoint_is_half_written_keeps_the_previous_one(run_copy, capsys):
    process = start_paused("checkpoint-half-written", TRAIN + ["--out", run_copy, "--steps", "8", "--resume"])
    kill(process)
    state = load_checkpoint(run_copy / CHECKPOINT_NAME)
    assert state["step"] == 4 and state["verified"]
    assert json.loads((run_copy / "model.json").read_text())["step"] == 4
    orphans = [name for name in dot_files(run_copy) if name.startswith(".model.safetensors.")]
    assert len(orphans) == 1 and LOCK_NAME in dot_files(run_copy)
    # The next start removes what the killed run left, and goes on.
    code, out, err = run(TRAIN + ["--out", run_copy, "--steps", "8", "--resume"], capsys)
    assert code == 0, err
    assert "removed 1 temporary file(s)" in out and "ended without releasing its lock" in out
    assert dot_files(run_copy) == []
    assert load_checkpoint(run_copy / CHECKPOINT_NAME)["step"] == 8


def test_kill_between_the_two_renames_while_holding_the_lock(run_copy, capsys):
    process = start_paused("between-renames", TRAIN + ["--out", run_copy, "--steps", "8", "--resume"])
    try:
        # While it runs, a second run on the folder is refused, naming it; nothing changes.
        before = contents(run_copy)
        for mode in ("--resume", "--overwrite"):
            line = assert_one_line_error(run(TRAIN + ["--out", run_copy, "--steps", "8", mode], capsys), "train", "in use by")
            assert f"process {process.pid} " in line
        assert contents(run_copy) == before
    finally:
        kill(process)
    assert load_checkpoint(run_copy / CHECKPOINT_NAME)["step"] == 8
    assert json.loads((run_copy / "model.json").read_text())["step"] == 4  # one version behind
    code, out, err = run(TRAIN + ["--out", run_copy, "--steps", "8", "--resume"], capsys)
    assert code == 0, err
    assert "rewritten from it" in out and "ended without releasing its lock" in out
    assert json.loads((run_copy / "model.json").read_text()) == read_document(run_copy / CHECKPOINT_NAME)
    assert dot_files(run_copy) == []


def test_kill_while_streaming_samples_keeps_the_old_file(run_folder, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    assert run(["sample", "--checkpoint", run_folder, "--num", "4", "--out", npz, "--no-progress"], capsys)[0] == 0
    before = npz.read_bytes()
    process = start_paused("npz-half-written", ["sample", "--checkpoint", run_folder, "--num", "16", "--batch-size", "4", "--seed", "1", "--out", npz, "--no-progress"])
    kill(process)
    assert npz.read_bytes() == before
    assert len(dot_files(tmp_path)) == 1  # the killed run's temporary file
    assert run(["sample", "--checkpoint", run_folder, "--num", "16", "--batch-size", "4", "--out", npz, "--no-progress"], capsys)[0] == 0
    assert dot_files(tmp_path) == []  # removed by the next write of the same file
    with np.load(npz) as archive:
        assert archive["images"].shape == (16, 3, 32, 32)


# ----------------------------------------------------------------------------- 4. one run per folder
@pytest.fixture(scope="module")
def held_folder(run_folder, tmp_path_factory):
    """A copy of the run whose lock another process holds for the module's tests."""
    folder = tmp_path_factory.mktemp("held") / "run"
    shutil.copytree(run_folder, folder)
    process = start_paused("hold-lock", [folder])
    yield folder, process
    kill(process)


@pytest.mark.parametrize("mode", [[], ["--resume"], ["--overwrite"]], ids=["new", "resume", "overwrite"])
def test_a_second_run_on_a_locked_folder_is_refused(mode, held_folder, capsys):
    folder, process = held_folder
    before = contents(folder)
    line = assert_one_line_error(run(TRAIN + ["--out", folder, "--steps", "8"] + mode, capsys), "train", "is in use by", f"process {process.pid} ")
    assert "-c" in line or "rgkern" in line  # the holder's command
    assert contents(folder) == before


def test_inpaint_into_a_locked_folder_is_refused(held_folder, run_folder, capsys):
    folder, process = held_folder
    result = run(["inpaint", "--checkpoint", run_folder, "--out", folder, "--num", "1", "--steps", "0", "--restarts", "1", "--skip-baseline", "--no-progress"], capsys)
    assert_one_line_error(result, "inpaint", f"process {process.pid} ")
    assert not (folder / "inpaint.json").exists()


def test_the_lock_api(held_folder, tmp_path):
    folder, process = held_folder
    with pytest.raises(RunFolderBusyError) as error:
        with run_lock(folder):
            pass
    assert error.value.holder["pid"] == process.pid
    with run_lock(tmp_path / "mine") as outer:
        with run_lock(tmp_path / "mine") as inner:  # re-entrant within a process
            assert inner is outer
        assert (tmp_path / "mine" / LOCK_NAME).exists()
    assert not (tmp_path / "mine" / LOCK_NAME).exists()  # released and removed


def test_a_finished_run_leaves_no_lock_or_temporary_file(run_folder):
    assert dot_files(run_folder) == []


# ----------------------------------------------------------------------------- 5. files: atomic, modes, orphans
@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "history.json", "bpd.png", "samples.png", "data.png"])
def test_run_files_have_the_mode_of_a_plain_open(name, run_folder):
    umask = os.umask(0)
    os.umask(umask)
    assert (run_folder / name).stat().st_mode & 0o777 == 0o666 & ~umask


def _fails_half_way(write_partial):
    def failing(*args, **kwargs):
        write_partial(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    return failing


@pytest.mark.parametrize("picture", ["bpd.png", "data.png"])
def test_a_picture_write_that_fails_keeps_the_previous_picture(picture, run_copy, monkeypatch):
    before = (run_copy / picture).read_bytes()
    if picture == "bpd.png":
        from matplotlib.figure import Figure

        monkeypatch.setattr(Figure, "savefig", _fails_half_way(lambda self, path, **kw: Path(path).write_bytes(b"\x89PNG partial")))
        call = lambda: plot_history([{"step": 0, "train_bpd": None, "test_bpd": 9.0}], run_copy / picture)
    else:
        monkeypatch.setattr(Image.Image, "save", _fails_half_way(lambda self, path, **kw: Path(path).write_bytes(b"\x89PNG partial")))
        call = lambda: save_image_grid(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), run_copy / picture)
    with pytest.raises(OSError, match=rf"cannot write '.*{picture}': no space left.*previous {picture} is unchanged"):
        call()
    assert (run_copy / picture).read_bytes() == before
    assert dot_files(run_copy) == []


def test_inpaint_writes_its_files_atomically(run_folder, tmp_path, image_folder, capsys, monkeypatch):
    out = tmp_path / "o"
    args = ["inpaint", "--checkpoint", run_folder, "--data", "folder", "--data-root", image_folder, "--num", "2",
            "--steps", "1", "--restarts", "1", "--skip-baseline", "--out", out, "--no-progress"]
    code, _, err = run(args, capsys)
    assert code == 0 and err == ""  # --no-progress: no progress bar either
    before = contents(out)
    assert json.loads(before["inpaint.json"])["num_images"] == 2
    from rgkern.tools import files

    real_replace = os.replace

    def full_disk_at_json(src, dst):
        if str(dst).endswith("inpaint.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk_at_json)
    assert_one_line_error(run(args, capsys), "inpaint", "inpaint.json", "previous inpaint.json is unchanged")
    monkeypatch.undo()
    assert contents(out)["inpaint.json"] == before["inpaint.json"] and dot_files(out) == []


def test_orphans_of_older_versions_are_removed_at_the_next_start(run_copy, capsys):
    for name in (".model.safetensors.k3j4h5g6.tmp", ".model.json.a1b2c3d4.tmp", ".write-test.zz11yy22"):
        (run_copy / name).write_bytes(b"x" * 1000)
    (run_copy / "notes.txt").write_text("mine")
    code, out, err = run(TRAIN + ["--out", run_copy, "--steps", "4", "--overwrite"], capsys)
    assert code == 0, err
    assert "removed 3 temporary file(s)" in out
    assert dot_files(run_copy) == [] and (run_copy / "notes.txt").read_text() == "mine"


def test_only_temporary_files_of_dead_processes_are_removed(tmp_path):
    from rgkern.tools.files import temporary_name

    mine = temporary_name(tmp_path / "a.png")  # this process: alive
    mine.write_bytes(b"live")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_name = mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-")
    (tmp_path / dead_name).write_bytes(b"dead")
    atomic_write(tmp_path / "a.png", lambda tmp: Path(tmp).write_bytes(b"new"))
    assert mine.exists() and not (tmp_path / dead_name).exists()
    assert (tmp_path / "a.png").read_bytes() == b"new"
    assert remove_orphans(tmp_path) == []


def test_a_missing_sidecar_is_rewritten_from_the_checkpoint(run_copy):
    (run_copy / "model.json").unlink()
    assert repair_sidecar(run_copy / CHECKPOINT_NAME) is True
    assert json.loads((run_copy / "model.json").read_text()) == read_document(run_copy / CHECKPOINT_NAME)
    assert repair_sidecar(run_copy / CHECKPOINT_NAME) is False


# ----------------------------------------------------------------------------- 6. full and read-only disks (tmpfs)
def test_full_disk_during_training_keeps_the_checkpoint(small_disk, run_folder, capsys):
    run_dir = small_disk / "run"
    shutil.copytree(run_folder, run_dir)
    before = contents(run_dir)
    fill(small_disk)
    line = assert_one_line_error(run(TRAIN + ["--out", run_dir, "--steps", "8", "--resume"], capsys), "train", "no space left")
    assert str(run_dir) in line
    assert contents(run_dir) == before and dot_files(run_dir) == []
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 4


def test_full_disk_keeps_the_previous_pictures(small_disk, run_folder):
    for name in ("bpd.png", "data.png"):
        shutil.copy(run_folder / name, small_disk / name)
    before = contents(small_disk)
    fill(small_disk)
    with pytest.raises(OSError, match="bpd.png.*no space left"):
        plot_history([{"step": 0, "train_bpd": None, "test_bpd": 9.0}, {"step": 4, "train_bpd": 9.1, "test_bpd": 8.9}], small_disk / "bpd.png")
    with pytest.raises(OSError, match="data.png.*no space left"):
        save_image_grid(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), small_disk / "data.png", scale=2)
    after = contents(small_disk)
    assert after["bpd.png"] == before["bpd.png"] and after["data.png"] == before["data.png"]
    assert dot_files(small_disk) == []


def test_the_msds_cache_on_a_full_disk_names_its_path(small_disk):
    from rgkern.data import load_dataset

    fill(small_disk)
    with pytest.raises(OSError, match=r"cannot write the MSDS cache '.*disk/cache/msds1_train.*\.npz'.*--data-root") as error:
        load_dataset("msds1", root=small_disk / "cache", split="train", size=16, progress=False)
    assert isinstance(error.value, InputError) and error.value.errno == errno.ENOSPC


def test_a_read_only_disk_is_a_clear_error(small_disk, run_folder, capsys):
    shutil.copytree(run_folder, small_disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert_one_line_error(run(["sample", "--checkpoint", small_disk / "run", "--num", "4", "--out", small_disk / "s.png"], capsys), "sample", "s.png")
    assert_one_line_error(run(TRAIN + ["--out", small_disk / "run", "--steps", "8", "--resume"], capsys), "train", "not writable")
    assert load_checkpoint(small_disk / "run" / CHECKPOINT_NAME)["step"] == 4


# ----------------------------------------------------------------------------- 7. numerics and API input
@pytest.mark.parametrize(
    "temperature, error, message",
    [
        ("0555", TypeError, "float or a sequence"),
        ("0.5", TypeError, "parse text first"),
        (True, TypeError, "float or a sequence"),
        ([0.5, "1", 0.5, 0.5], TypeError, "float or a sequence"),
        (1e38, ValueError, "<= 10000"),
        (float("inf"), ValueError, "finite"),
        (float("nan"), ValueError, "finite"),
        ([1.0, 1e5, 1.0, 1.0], ValueError, "<= 10000"),
        (-0.5, ValueError, ">= 0"),
    ],
    ids=["digits-string", "float-string", "bool", "string-in-list", "1e38", "inf", "nan", "one-level-huge", "negative"],
)
def test_a_bad_temperature_is_refused_by_the_api(temperature, error, message, trained):
    with pytest.raises(error, match=message):
        trained.sample(1, temperature=temperature)


def test_numeric_temperatures_of_other_types_mean_the_same(trained):
    expected = trained.sample(2, 0.5, torch.Generator().manual_seed(0))
    for same in (torch.tensor(0.5), np.float32(0.5), [0.5] * 4, torch.full((4,), 0.5)):
        assert torch.equal(trained.sample(2, same, torch.Generator().manual_seed(0)), expected)


def test_inpaint_refuses_a_temperature_that_would_overflow():
    from rgkern import inpaint

    model = tiny_model(8, 1, 4)
    known = torch.ones(8, 8, dtype=torch.bool)
    known[2:4, 2:4] = False
    with pytest.raises(ValueError, match="<= 10000"):
        inpaint(model, random_images(model, batch=1), known, steps=1, restarts=1, temperature=1e30)


def test_a_run_folder_whose_checkpoint_is_a_folder(run_copy, capsys):
    (run_copy / CHECKPOINT_NAME).unlink()
    (run_copy / CHECKPOINT_NAME).mkdir()
    assert_one_line_error(run(["evaluate", "--checkpoint", run_copy, "--no-progress"], capsys), "evaluate", "is a folder, not a checkpoint file")


def test_sample_zero_names_the_number_of_samples(trained):
    with pytest.raises(ValueError, match=r"number of samples n must be a positive int, got 0") as error:
        trained.sample(0)
    assert "batch_size" not in str(error.value)


def _empty_batch_calls():
    from rgkern import IncrementalDecoder, IncrementalEncoder, inpaint

    model = tiny_model(8, 1, 4)
    empty = torch.zeros(0, 1, 8, 8, dtype=torch.float64)
    known = torch.ones(8, 8, dtype=torch.bool)
    known[2:4, 2:4] = False
    return {
        "encode": lambda: model.encode(empty),
        "decode": lambda: model.decode(empty),
        "log_prob": lambda: model.log_prob(empty),
        "incremental-encoder": lambda: IncrementalEncoder(model, empty),
        "incremental-decoder": lambda: IncrementalDecoder(model, empty),
        "inpaint": lambda: inpaint(model, empty, known, steps=1, restarts=1),
        "sample_latents": lambda: model.sample_latents(0),
    }


@pytest.mark.parametrize("call", list(_empty_batch_calls()))
def test_a_batch_of_size_0_is_a_clear_value_error(call):
    with pytest.raises(ValueError, match=r"batch size 0|positive int, got 0"):
        _empty_batch_calls()[call]()


def _layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides


@pytest.mark.parametrize("kind", ["channels_last", "transposed"])
@pytest.mark.parametrize("direction", ["encoder", "decoder"])
def test_incremental_passes_take_any_memory_layout(kind, direction):
    model = tiny_model(16, 3, 4)  # float64, random couplings
    x = random_images(model, batch=2)
    region = torch.zeros(16, 16, dtype=torch.bool)
    if direction == "encoder":
        region[5:7, 6:8] = True
    else:  # one latent of the lowest level: a small generation cone
        region.view(-1)[int(torch.nonzero(model.levels.flatten() == 0)[0])] = True
    if direction == "encoder":
        cached, new = x, x.clone()
        new[:, :, region] += 0.7
        inc = rgkern.IncrementalEncoder(model, _layout(cached, kind))
        result, expected = inc.update(_layout(new, kind), region), model.encode(new)[0]
    else:
        cached = model.encode(x)[0].detach()
        new = cached.clone()
        new[:, :, region] -= 0.4
        inc = rgkern.IncrementalDecoder(model, _layout(cached, kind))
        result, expected = inc.update(_layout(new, kind), region), model.decode(new)
    assert not inc.last_update_was_full
    error = (result - expected).abs().max() / expected.abs().max()
    assert error < 1e-12


def _poisoned_prior(monkeypatch, bad_image: int):
    """The Laplace sampler's failure mode: -inf drawn for one latent of image ``bad_image``."""
    from rgkern.core.priors import LaplacePrior

    real = LaplacePrior.sample
    drawn = {"count": 0}

    def sample(self, shape, temperature, generator=None, device=None, dtype=torch.float32):
        z = real(self, shape, temperature, generator=generator, device=device, dtype=dtype)
        first = drawn["count"]
        drawn["count"] += shape[0]
        if first <= bad_image < first + shape[0]:
            z[bad_image - first, 0, 5, 5] = -float("inf")
        return z

    monkeypatch.setattr(LaplacePrior, "sample", sample)


def test_non_finite_samples_stop_write_samples_and_nothing_is_written(trained, tmp_path, monkeypatch):
    png, npz = tmp_path / "g.png", tmp_path / "a.npz"
    write_samples(trained, num=4, png=png, npz=npz, seed=0, progress=False)
    before = contents(tmp_path)
    _poisoned_prior(monkeypatch, bad_image=6)
    with pytest.raises(NonFiniteSampleError, match=r"NaN or inf in 1 image\(s\) \(index 6\).*nothing was written") as error:
        write_samples(trained, num=12, png=png, npz=npz, batch_size=4, seed=1, progress=False)
    assert error.value.indices == [6]
    assert contents(tmp_path) == before and dot_files(tmp_path) == []


def test_non_finite_samples_stop_sample_images(trained, monkeypatch):
    _poisoned_prior(monkeypatch, bad_image=1)
    batches = sample_images(trained, 3, batch_size=3, seed=0, progress=False)
    with pytest.raises(NonFiniteSampleError) as error:
        list(batches)
    assert error.value.indices == [1]


def test_allowed_non_finite_samples_are_reported(trained, tmp_path, monkeypatch):
    _poisoned_prior(monkeypatch, bad_image=2)
    result = write_samples(trained, num=5, npz=tmp_path / "a.npz", batch_size=2, seed=0, progress=False, allow_nonfinite=True)
    assert result["nonfinite"] == [2]
    with np.load(result["npz"]) as archive:
        assert archive["images"].shape == (5, 3, 32, 32)


def test_the_sample_command_fails_on_non_finite_samples(run_folder, tmp_path, capsys, monkeypatch):
    _poisoned_prior(monkeypatch, bad_image=3)
    npz = tmp_path / "s.npz"
    args = ["sample", "--checkpoint", run_folder, "--num", "9", "--batch-size", "3", "--seed", "1", "--out", npz, "--no-progress"]
    assert_one_line_error(run(args, capsys), "sample", "index 3", "--allow-nonfinite")
    assert not npz.exists() and dot_files(tmp_path) == []


def test_the_sample_command_reports_allowed_non_finite_samples(run_folder, tmp_path, capsys, monkeypatch):
    _poisoned_prior(monkeypatch, bad_image=3)
    npz = tmp_path / "s.npz"
    code, out, err = run(["sample", "--checkpoint", run_folder, "--num", "6", "--out", npz, "--no-progress", "--allow-nonfinite"], capsys)
    assert code == 0 and npz.exists()
    assert err.strip() == "rgkern sample: warning: 1 of 6 images hold NaN or inf (written with those pixels 0): index 3"


def test_inpaint_never_writes_non_finite_results(run_folder, tmp_path, capsys, monkeypatch):
    from rgkern.cli import inpaint as inpaint_command

    real = inpaint_command.inpaint

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        result.images[0, 0, 0, 0] = float("nan")
        return result

    monkeypatch.setattr(inpaint_command, "inpaint", poisoned)
    out = tmp_path / "o"
    result = run(["inpaint", "--checkpoint", run_folder, "--num", "1", "--steps", "0", "--restarts", "1", "--skip-baseline", "--out", out, "--no-progress"], capsys)
    assert_one_line_error(result, "inpaint", "NaN or inf in image(s) [0]", "nothing was written")
    assert not (out / "inpaint.png").exists() and not (out / "inpaint.json").exists()


# ----------------------------------------------------------------------------- 8. unclear errors made clear, progress bars
def test_folder_data_smaller_than_the_preset_names_the_setting(image_folder, tmp_path, capsys):
    line = assert_one_line_error(
        run(["train", "--preset", "tiny", "--data", "folder", "--data-root", image_folder, "--out", tmp_path / "r", "--no-progress"], capsys),
        "train", "has 8 images", "train_size=64", "preset 'tiny'", "--train-size 8",
    )
    assert "Traceback" not in line


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_no_progress_means_an_empty_stderr(command, run_folder, tmp_path, capsys):
    args = [command, "--checkpoint", run_folder, "--no-progress"] + (["--num", "4", "--out", tmp_path / "s.png"] if command == "sample" else [])
    code, _, err = run(args, capsys)
    assert code == 0 and err == ""
