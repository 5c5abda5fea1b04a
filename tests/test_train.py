"""Tests for rgkern.tools.train: learning, bit-identical resume, NaN stop, bf16, bad folders and configs."""
import json
import math

import pytest
import torch

from rgkern.core.model import default_n_layers
from rgkern.tools.checkpoint import CheckpointError, load_checkpoint
from rgkern.tools.evaluation import evaluate_bpd, quality_kind, sample_quality
from rgkern.tools.presets import PRESETS, TrainConfig, make_config, preset_names, resume_config
from rgkern.tools.train import CHECKPOINT_NAME, HISTORY_NAME, build_model, train
from rgkern.tools.trainer import DivergenceError, Trainer, batch_indices

from utils import assert_same_state, msds_images, quiet, tiny_config, trainer


@pytest.fixture(scope="module")
def images():
    return msds_images(96, 32)


def tiny(**overrides):
    """The tiny preset on this file's 96 training and 32 test images."""
    return tiny_config(**{"train_size": 96, "test_size": 32, **overrides})


# ----------------------------------------------------------------------------- learning
def test_short_training_lowers_heldout_bits_per_dim(tmp_path):
    config = tiny(steps=30, eval_every=30, checkpoint_every=30, train_size=96)
    result = train(config, tmp_path / "run", progress=False, log=quiet)
    first, last = result.history[0], result.history[-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert first["train_bpd"] is None and math.isfinite(last["train_bpd"])
    # From about 9.5 at the identity initialisation to about 7.4 (fixed seed).
    assert last["test_bpd"] < first["test_bpd"] - 1.0
    assert result.test_bpd == last["test_bpd"]


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    result = train(tiny(steps=4, eval_every=2, checkpoint_every=4), out, progress=False, log=quiet)
    history = json.loads((out / HISTORY_NAME).read_text())
    assert [e["step"] for e in history] == [0, 2, 4]
    assert history == json.loads(json.dumps(result.history))
    assert (out / "model.json").exists()
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 4
    assert state["info"]["train_config"]["preset"] == "tiny"
    assert state["info"]["history"] == history
    assert {"noise_rng", "torch_rng"} <= set(state["extra_tensors"])
    assert_same_state(state["model"], result.model)


def test_data_order_is_a_permutation_per_epoch():
    n, batch = 50, 16  # 3 updates per epoch, 2 images left out each epoch
    epoch0 = torch.cat([batch_indices(s, n, batch, seed=3) for s in range(3)])
    epoch1 = torch.cat([batch_indices(s, n, batch, seed=3) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(batch_indices(4, n, batch, seed=3), batch_indices(4, n, batch, seed=3))
    assert not torch.equal(batch_indices(0, n, batch, seed=3), batch_indices(0, n, batch, seed=4))
    with pytest.raises(ValueError, match="larger than"):
        batch_indices(0, 8, 16, seed=0)


def test_evaluation_is_deterministic_and_independent_of_batch_size(images):
    model = build_model(tiny(), 32, 3)
    test_images = images[1]
    a = evaluate_bpd(model, test_images, batch_size=32)
    b = evaluate_bpd(model, test_images, batch_size=32)
    c = evaluate_bpd(model, test_images, batch_size=5)
    assert a == b
    assert c == pytest.approx(a, rel=1e-6)


# ----------------------------------------------------------------------------- quality score
def test_msds_runs_record_the_samples_quality_score_without_changing_the_run(tmp_path, images):
    from rgkern.tools.quality import msds_quality
    from rgkern.tools.sampling import sample_images

    config = tiny(steps=4, eval_every=2, checkpoint_every=100, sample_temperatures=[1.0, [0.5, 0.6, 0.7, 0.8]])
    scored = trainer(config, images, tmp_path / "scored")
    scored.fit(progress=False)
    plain = trainer(config, images, tmp_path / "plain")
    plain.quality_kind = None
    plain.fit(progress=False)
    assert_same_state(scored.model, plain.model)  # sampling touches no training state
    assert [e["test_bpd"] for e in scored.history] == [e["test_bpd"] for e in plain.history]
    assert all("quality" not in e for e in plain.history)
    assert [list(e["quality"]) for e in scored.history] == [["1", "0.5,0.6,0.7,0.8"]] * 3
    # The last entry is the score of QUALITY_SAMPLES samples of the final model at the fixed seed.
    last = scored.history[-1]["quality"]
    assert last == sample_quality(scored.model, 1, [1.0, [0.5, 0.6, 0.7, 0.8]])
    samples = torch.cat(list(sample_images(scored.model, 64, temperature=1.0, seed=20_200_102, progress=False)))
    assert last["1"] == msds_quality(samples, kind=1) and last["1"]["images"] == 64


def test_quality_kind_is_for_msds_images_only():
    assert quality_kind("msds1") == 1 and quality_kind("MSDS2") == 2
    assert quality_kind("cifar10") is None and quality_kind("folder") is None
    assert quality_kind("msds1", (1, 32, 32)) is None and quality_kind("msds2", (3, 32, 32)) == 2


def test_sample_temperatures_one_list_and_the_old_single_temperature():
    assert tiny().sample_temperatures == [1.0, 0.7]
    assert tiny(sample_temperatures=[0.8]).sample_temperatures == [0.8]
    assert tiny(sample_temperatures=[0.5, [1.0, 0.2, 0.2, 0.2]]).sample_temperatures == [0.5, [1.0, 0.2, 0.2, 0.2]]
    assert "sample_temperature" not in tiny().to_dict()  # one setting, one name
    with pytest.raises(ValueError, match="unknown training settings"):
        make_config("tiny", sample_temperature=0.8)
    saved = tiny(sample_temperatures=[0.8]).to_dict()
    assert resume_config(saved).sample_temperatures == [0.8]
    assert resume_config(saved, sample_temperatures=[1.0, 0.3]).sample_temperatures == [1.0, 0.3]
    # Runs saved with the former single temperature keep it on resume (it applied instead of
    # the list), unless new temperatures are given; None there meant "use the list".
    older = {**tiny().to_dict(), "sample_temperature": 0.8}
    assert resume_config(older).sample_temperatures == [0.8]
    assert resume_config(older, sample_temperatures=[1.0, 0.3]).sample_temperatures == [1.0, 0.3]
    assert "sample_temperature" not in resume_config(older).to_dict()
    assert resume_config({**tiny(sample_temperatures=[0.5]).to_dict(), "sample_temperature": None}).sample_temperatures == [0.5]
    oldest = tiny().to_dict()
    oldest.pop("sample_temperatures")
    oldest["sample_temperature"] = 1.0  # as saved before the list existed
    assert resume_config(oldest).sample_temperatures == [1.0]
    oldest.pop("sample_temperature")  # before either existed
    assert resume_config(oldest).sample_temperatures == [1.0, 0.7]
    for bad in ([], 0.7, [1.0] * 9):
        with pytest.raises(ValueError, match="sample_temperatures must be a list of 1 to 8"):
            tiny(sample_temperatures=bad)


def test_resume_is_bit_identical(tmp_path, images):
    steps = 3
    config = tiny(steps=2 * steps, eval_every=2, checkpoint_every=100)
    straight = trainer(config, images, tmp_path / "straight")
    straight.fit(progress=False)

    first = trainer(tiny(steps=steps, eval_every=2, checkpoint_every=100), images, tmp_path / "split")
    first.fit(progress=False)
    second = trainer(config, images, tmp_path / "split")
    second.resume()
    assert second.step == steps
    second.fit(progress=False)

    assert_same_state(straight.model, second.model)
    opt_a, opt_b = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for index in opt_a:
        for name in opt_a[index]:
            assert torch.equal(torch.as_tensor(opt_a[index][name]), torch.as_tensor(opt_b[index][name])), (index, name)
    assert torch.equal(straight.noise_generator.get_state(), second.noise_generator.get_state())
    # The split run also evaluated at its end (step 3); the shared points agree exactly.
    assert [e["step"] for e in straight.history] == [0, 2, 4, 6]
    assert [e["step"] for e in second.history] == [0, 2, 3, 4, 6]
    held_out = {e["step"]: e["test_bpd"] for e in second.history}
    assert all(held_out[e["step"]] == e["test_bpd"] for e in straight.history)
    quality = {e["step"]: e["quality"] for e in second.history}  # the samples' score too
    assert all(quality[e["step"]] == e["quality"] for e in straight.history)


def test_resume_through_train_continues_the_run(tmp_path):
    out = tmp_path / "run"
    train(tiny(steps=2, eval_every=2, checkpoint_every=2), out, progress=False, log=quiet)
    result = train(tiny(steps=4, eval_every=2, checkpoint_every=2), out, resume=True, progress=False, log=quiet)
    assert [e["step"] for e in result.history] == [0, 2, 4]
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


def test_resume_with_a_different_model_config_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny(steps=1), out, progress=False, log=quiet)
    with pytest.raises(CheckpointError, match="different model config"):
        train(tiny(steps=2, model={"n_layers": 2}), out, resume=True, progress=False, log=quiet)


def test_resume_with_different_training_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    train(tiny(steps=1), out, progress=False, log=quiet)
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny(steps=2, batch_size=8), out, resume=True, progress=False, log=quiet)


def test_existing_and_missing_checkpoints(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(tiny(steps=1), out, resume=True, progress=False, log=quiet)
    train(tiny(steps=1), out, progress=False, log=quiet)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(tiny(steps=1), out, progress=False, log=quiet)
    result = train(tiny(steps=1, seed=1), out, overwrite=True, progress=False, log=quiet)
    assert load_checkpoint(out / CHECKPOINT_NAME)["info"]["train_config"]["seed"] == 1
    assert len(result.history) == 2


# ----------------------------------------------------------------------------- failures
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, images, monkeypatch):
    reference = trainer(tiny(steps=5, eval_every=5, checkpoint_every=5), images, tmp_path / "reference")
    reference.fit(progress=False)

    original_loss = Trainer.loss

    def poisoned_loss(self, batch):
        loss = original_loss(self, batch)
        return loss * float("nan") if self.step == 6 else loss  # the 7th update

    monkeypatch.setattr(Trainer, "loss", poisoned_loss)
    run = trainer(tiny(steps=10, eval_every=5, checkpoint_every=5), images, tmp_path / "run")
    with pytest.raises(DivergenceError, match=r"step 7: the loss is nan") as error:
        run.fit(progress=False)
    assert error.value.step == 7
    assert run.step == 6
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert saved["step"] == 5
    assert_same_state(saved["model"], reference.model)
    assert json.loads((tmp_path / "run" / HISTORY_NAME).read_text())[-1]["step"] == 5


def test_nan_gradient_stops_training_before_the_update(tmp_path, images):
    run = trainer(tiny(steps=10, checkpoint_every=5), images, tmp_path / "run")
    parameter = next(run.model.parameters())
    handle = parameter.register_hook(lambda grad: grad * float("nan") if run.step == 2 else grad)
    for _ in range(2):
        run.train_step()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(DivergenceError, match=r"step 3: the gradient norm is nan.*no checkpoint was written"):
        run.train_step()
    handle.remove()
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()
    assert run.train_step() > 0  # training can go on from the last good state


def test_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the output folder was checked")

    monkeypatch.setattr("rgkern.tools.train.load_images", no_data)
    with pytest.raises(PermissionError, match="not writable"):
        train(tiny(), blocker / "run", progress=False, log=quiet)


def test_read_only_output_folder(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            train(tiny(), folder, progress=False, log=quiet)
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------- bf16
def test_bf16_steps_are_finite_and_close_to_float32(tmp_path, images):
    """Three steps with and without bf16 autocast from the same non-identity weights.

    At initialisation every coupling is the identity (the output scales start at zero), so
    the first loss would not depend on the precision of the networks at all; the scales are
    randomised first, the same way in both runs.
    """
    losses = {}
    for bf16 in (False, True):
        run = trainer(tiny(bf16=bf16, steps=3), images, tmp_path / f"bf16_{bf16}")
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in run.model.named_parameters():
                if name.endswith(("s_scale", "t_scale")):
                    param.copy_(0.5 * torch.randn(param.shape, generator=generator))
        losses[bf16] = [run.train_step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses[True])
    for a, b in zip(losses[False], losses[True]):
        assert b == pytest.approx(a, rel=0.01)
    # bf16 really ran from non-identity couplings: the networks' rounding shows already in
    # the first loss (with identity couplings the two first losses are equal) ...
    first, first_bf16 = losses[False][0], losses[True][0]
    assert first != first_bf16
    # ... and in every image's log-likelihood, by more than float32 rounding (1e-7 relative
    # here); the batch mean, the loss, averages much of it out (measured: 8e-7 relative
    # there, 3e-6 to 1.8e-4 per image).
    y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = run.model.log_prob(y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = run.model.log_prob(y)
    relative = ((mixed - plain) / plain).abs()
    assert (relative > 1e-6).all() and relative.max() > 3e-5, relative


# ----------------------------------------------------------------------------- configs
def test_presets():
    assert {"paper", "paper-msds", "cpu"} <= set(preset_names())
    assert "tiny" not in preset_names() and "tiny" in preset_names(include_hidden=True)
    paper = make_config("paper")
    assert paper.model["hidden"] == 512 and paper.model["n_res"] == 4 and paper.model["n_mlp"] == 2
    assert paper.batch_size == 64 and paper.lr == 1e-3 and paper.weight_decay == 5e-5 and paper.grad_clip == 1.0
    assert paper.model["n_layers"] is None and default_n_layers(4) == (8, 6, 4, 2)  # the model's default
    msds = make_config("paper-msds")
    assert msds.data == "msds1" and msds.model["n_layers"] == 4 and msds.model["n_res"] == 4
    cpu = make_config("cpu", steps=7, model={"hidden": 16})
    assert cpu.steps == 7 and cpu.model["hidden"] == 16 and PRESETS["cpu"]["model"]["hidden"] != 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(lr=-1.0), "lr must be a finite number"),
        (dict(steps=1.5), "steps must be a positive int"),
        (dict(model={"image_size": 64}), "taken from the data"),
        (dict(sample_temperatures=[[1.0, 1.0]]), "expected one per RG level"),
        (dict(sample_temperatures=[1.0, [1.0, 1.0]]), "expected one per RG level"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny(**overrides), tmp_path / "run", progress=False, log=quiet)


def test_unknown_preset_and_setting():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown training settings"):
        make_config("cpu", learning_rate=1.0)
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"steps": 1}, "unused")
    assert isinstance(make_config("tiny"), TrainConfig)
