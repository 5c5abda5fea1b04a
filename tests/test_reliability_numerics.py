"""Reliability, numerics and API input: no silent NaN, no overflow, clear errors for bad values.

Every case asserts its outcome: a clear exception, a correct result, or nothing written.
The shared run folder, the trained model and the helpers are in ``conftest.py`` and ``utils.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rgkern
from rgkern.tools.sampling import NonFiniteSampleError, sample_images, write_samples
from rgkern.tools.train import CHECKPOINT_NAME

from utils import assert_one_line_error, contents, dot_files, random_images, run, tiny_model


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
