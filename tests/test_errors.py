"""Errors for input a user can fix (rgkern.core.errors) and how the command line reports them.

Only an InputError (or a subclass) becomes the one-line ``rgkern <command>: error: ...`` with
exit code 2; a diverged training run (DivergenceError) is its own one line, ``rgkern train:
training diverged: ...``, with exit code 3; any other exception from a handler is a bug and
keeps its traceback.
"""
import errno
import subprocess
import sys
import textwrap

import pytest

from rgkern import cli
from rgkern.cli import train as train_commands
from rgkern.core.errors import (
    InputError,
    InputFileError,
    InputFileExistsError,
    InputFileNotFoundError,
    InputIsADirectoryError,
    InputNotADirectoryError,
    InputPermissionError,
    InputTypeError,
    file_error,
)
from rgkern.data import DataNotFoundError
from rgkern.tools.checkpoint import CheckpointError
from rgkern.tools.distributed import DistributedSetupError
from rgkern.tools.trainer import DivergenceError, Trainer


def test_input_errors_are_the_builtin_types_callers_catch():
    assert issubclass(InputError, ValueError)
    assert issubclass(InputTypeError, InputError) and issubclass(InputTypeError, TypeError)
    for error_type in (CheckpointError, DistributedSetupError, DataNotFoundError, InputFileError):
        assert issubclass(error_type, InputError), error_type
    assert issubclass(DivergenceError, RuntimeError) and issubclass(DistributedSetupError, RuntimeError)
    # A diverged run is not input the user got wrong: the settings were valid, the run did not converge.
    assert not issubclass(DivergenceError, (InputError, ValueError))
    assert issubclass(DataNotFoundError, FileNotFoundError)


@pytest.mark.parametrize(
    "code, expected",
    [
        (errno.ENOSPC, InputFileError),
        (errno.EROFS, InputFileError),
        (None, InputFileError),
        (errno.ENOENT, InputFileNotFoundError),
        (errno.EEXIST, InputFileExistsError),
        (errno.EACCES, InputPermissionError),
        (errno.EPERM, InputPermissionError),
        (errno.EISDIR, InputIsADirectoryError),
        (errno.ENOTDIR, InputNotADirectoryError),
    ],
)
def test_file_error_is_the_oserror_the_os_would_give(code, expected):
    error = file_error(code, "cannot write 'x'")
    assert type(error) is expected
    plain = OSError(code, "cannot write 'x'")
    assert isinstance(error, type(plain)) and isinstance(error, InputError)
    assert error.errno == plain.errno and str(error) == str(plain)


def fail_with(error):
    def handler(args):
        raise error

    return handler


def test_an_input_error_is_one_line_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(train_commands, "run_evaluate", fail_with(InputError("--checkpoint 'x'\n is not usable")))
    assert cli.main(["evaluate", "--checkpoint", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "rgkern evaluate: error: --checkpoint 'x' is not usable\n"


def test_a_diverged_run_is_its_own_line_and_exit_code(monkeypatch, capsys):
    error = DivergenceError("step 7: the loss is nan;\n the update was not applied", 7)
    monkeypatch.setattr(train_commands, "run_evaluate", fail_with(error))
    assert cli.main(["evaluate", "--checkpoint", "x"]) == cli.DIVERGED_EXIT_CODE == 3
    assert capsys.readouterr().err == "rgkern evaluate: training diverged: step 7: the loss is nan; the update was not applied\n"


def test_train_reports_a_divergence_without_a_traceback(tmp_path, monkeypatch, capsys):
    """A real run through ``rgkern train`` whose loss becomes NaN at the 3rd update (after the checkpoint at step 2)."""
    original_loss = Trainer.loss

    def poisoned_loss(self, batch):
        loss = original_loss(self, batch)
        return loss * float("nan") if self.step == 2 else loss

    monkeypatch.setattr(Trainer, "loss", poisoned_loss)
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--out", str(out), "--steps", "4", "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("rgkern train: training diverged: step 3: the loss is nan; the update was not applied"), err
    assert f"the last checkpoint ({out / 'model.safetensors'}) is unchanged" in err[0]
    assert "error:" not in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("error", [RuntimeError("a real bug"), ValueError("a plain ValueError"), TypeError("a plain TypeError"), OSError(errno.EIO, "I/O error")])
def test_any_other_error_propagates(monkeypatch, capsys, error):
    monkeypatch.setattr(train_commands, "run_evaluate", fail_with(error))
    with pytest.raises(type(error)) as info:
        cli.main(["evaluate", "--checkpoint", "x"])
    assert info.value is error
    assert "error:" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_under_python_dash_m_rgkern():
    script = textwrap.dedent(
        """
        import sys
        import rgkern.cli.train as commands

        def bug(args):
            raise RuntimeError("a real bug")

        commands.run_evaluate = bug
        from rgkern.cli import main
        sys.exit(main(["evaluate", "--checkpoint", "x"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "in bug" in result.stderr and "RuntimeError: a real bug" in result.stderr
    assert "rgkern evaluate: error:" not in result.stderr
