"""Reliability, files: kill -9 during writes, one run per folder, atomic writes, modes, orphans, full disks.

Every case asserts its outcome: the previous file intact, a second run refused, nothing
left behind. Kills are real (``SIGKILL`` of a subprocess paused inside a write); a full or
read-only disk is a small tmpfs where this machine lets the test mount one (root), and is
skipped otherwise. The shared run folder and the helpers are in ``conftest.py`` and ``utils.py``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rgkern.core.errors import InputError
from rgkern.tools.authors_checkpoint import authors_state_dict
from rgkern.tools.checkpoint import load_checkpoint, read_document, repair_sidecar
from rgkern.tools.files import LOCK_NAME, RunFolderBusyError, atomic_write, remove_orphans, run_lock
from rgkern.tools.plots import plot_history, save_image_grid
from rgkern.tools.train import CHECKPOINT_NAME

from utils import TRAIN, assert_one_line_error, contents, dot_files, fill, kill, random_authors_model, run, start_paused


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


def test_import_authors_into_a_locked_folder_is_refused(held_folder, tmp_path, capsys):
    folder, process = held_folder
    before = contents(folder)
    authors_file = tmp_path / "1.state"
    torch.save({"flow": authors_state_dict(random_authors_model(16, 1, 4, n_layers=1))}, authors_file)
    result = run(["import-authors", authors_file, "--out", folder, "--overwrite"], capsys)
    assert_one_line_error(result, "import-authors", "is in use by", f"process {process.pid} ")
    assert contents(folder) == before  # the training's checkpoint is still its own


def test_import_authors_onto_a_file_is_one_line(tmp_path, capsys):
    authors_file, plain_file = tmp_path / "1.state", tmp_path / "taken"
    torch.save({"flow": authors_state_dict(random_authors_model(16, 1, 4, n_layers=1))}, authors_file)
    plain_file.write_text("mine")
    assert_one_line_error(run(["import-authors", authors_file, "--out", plain_file], capsys), "import-authors", "is a file")
    assert plain_file.read_text() == "mine"
    code, out, _ = run(["import-authors", authors_file, "--out", tmp_path / "run"], capsys)
    assert code == 0 and (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_command_of_several_outputs_writes_them_under_their_folder_lock(held_folder, run_folder, tmp_path, capsys):
    """Two progressive runs writing one PNG and GIF left the PNG of one and the GIF of the other;
    a command with several outputs holds their folder's lock, so the second run is refused."""
    folder, process = held_folder
    before = contents(folder)
    for argv, command in ((["progressive", "--out", folder / "p.png", "--gif", folder / "p.gif"], "progressive"),
                          (["receptive-fields", "--out", folder / "rf.png", "--num", "2"], "receptive-fields")):
        result = run(argv + ["--checkpoint", run_folder, "--no-progress"], capsys)
        assert_one_line_error(result, command, "is in use by", f"process {process.pid} ")
    assert contents(folder) == before
    free = tmp_path / "pictures"
    code, _, _ = run(["progressive", "--checkpoint", run_folder, "--out", free / "p.png", "--gif", free / "p.gif", "--num", "2",
                      "--no-progress"], capsys)
    assert code == 0 and sorted(p.name for p in free.iterdir()) == ["p.gif", "p.png"]  # no lock left behind


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


def test_a_link_planted_at_the_lock_is_refused_and_its_target_left_alone(tmp_path):
    folder, outside = tmp_path / "run", tmp_path / "outside.txt"
    folder.mkdir()
    outside.write_text("precious")
    (folder / LOCK_NAME).symlink_to(outside)
    with pytest.raises(OSError, match="is a symbolic link"):
        with run_lock(folder):
            pass
    assert outside.read_text() == "precious"
    assert (folder / LOCK_NAME).is_symlink()  # left for the user to look at


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


@pytest.mark.parametrize("bad", [["--batch-size", "100000"], ["--n-layers", "1,1"], ["--sample-temperatures", "1e5"],
                                 ["--data", "folder", "--data-root", "/no/such/folder"]],
                         ids=["batch-larger-than-data", "n-layers-entries", "temperature", "data-root"])
def test_a_refused_overwrite_leaves_the_run_as_it_was(bad, run_copy, capsys):
    """train --overwrite removed the old checkpoint, document and history before it checked its
    arguments, data and model: a typo lost the run."""
    before = contents(run_copy)
    code, _, err = run(TRAIN + ["--out", run_copy, "--overwrite", "--steps", "2"] + bad, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert contents(run_copy) == before


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
