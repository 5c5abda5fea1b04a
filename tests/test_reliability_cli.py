"""Reliability, bad command lines: exit code 2 with one line ``rgkern <command>: error: ...``.

Every case asserts its outcome: one line on stderr and no traceback, and nothing written.
Also the errors that were unclear and are now clear, and ``--no-progress``. The shared run
folder and the helpers are in ``conftest.py`` and ``utils.py``.
"""
from __future__ import annotations

import pytest
import torch

from utils import assert_one_line_error, contents, run

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
    pytest.param(["train", "--preset", "tiny", "--out", "OUT", "--n-layers", "0"], "train", ["no weights to train", "0 blocks is the identity"], id="n-layers-zero"),
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
    # A picture never replaces a checkpoint or a run's document, and two outputs never one file.
    pytest.param(["receptive-fields", "--checkpoint", "RUN", "--out", "RUN/model.safetensors"], "receptive-fields", ["--out takes a file name ending in .png"], id="rf-over-checkpoint"),
    pytest.param(["receptive-fields", "--checkpoint", "RUN", "--out", "OUT/r.png", "--hist-out", "RUN/model.json"], "receptive-fields", ["--hist-out takes a file name ending in .png"], id="rf-hist-over-document"),
    pytest.param(["receptive-fields", "--checkpoint", "RUN", "--out", "OUT/r.png", "--hist-out", "OUT/r.png"], "receptive-fields", ["--hist-out and --out name the same file"], id="rf-same-file"),
    pytest.param(["receptive-fields", "--checkpoint", "RUN", "--out", "OUT/r.png", "--per-level", "100000"], "receptive-fields", ["--per-level 100000", "at most 64 fields per level"], id="rf-per-level-huge"),
    pytest.param(["traverse", "--checkpoint", "RUN", "--out", "OUT/t.jpg"], "traverse", ["--out takes a file name ending in .png", "t.jpg"], id="traverse-jpg"),
    pytest.param(["scale-mix", "--checkpoint", "RUN", "--out", "OUT/m.txt"], "scale-mix", ["--out takes"], id="scale-mix-txt"),
    pytest.param(["progressive", "--checkpoint", "RUN", "--out", "OUT/p.png", "--gif", "OUT/p.png"], "progressive", ["--gif takes a file name ending in .gif"], id="progressive-gif-png"),
    pytest.param(["nocommand"], None, ["invalid choice: 'nocommand'"], id="unknown-command"),
    pytest.param([], None, ["a command is required", "train"], id="no-command"),
]


@pytest.mark.parametrize("argv, command, fragments", BAD_ARGUMENTS)
def test_a_bad_command_line_is_one_line_with_exit_code_2(argv, command, fragments, run_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [str(out) + a[3:] if a.startswith("OUT") else str(run_folder) + a[3:] if a.startswith("RUN") else a for a in argv]
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
