"""Tests for the training options a user of the authors' code expects: random horizontal flips,
float64 training, no gradient clipping, learning-rate schedules, the architecture and optimiser flags of ``train``,
``--resume`` taking the run's own settings, and the CelebA / MNIST data through the CLI."""
import json
import math

import pytest
import torch

from rgkern import cli
from rgkern.core.preprocess import bits_per_dim, preprocess
from rgkern.tools.checkpoint import load_checkpoint, load_model, read_document, save_checkpoint
from rgkern.tools.evaluation import evaluate_bpd
from rgkern.tools.presets import learning_rate, resume_config
from rgkern.tools.train import CHECKPOINT_NAME, build_model, train
from rgkern.tools.trainer import Trainer, batch_indices, flip_mask

from utils import assert_same_state, msds_images, quiet, tiny_config, trainer


@pytest.fixture(scope="module")
def images():
    return msds_images(64, 16)


def tiny(**overrides):
    """The tiny preset on this file's 64 training and 16 test images."""
    return tiny_config(**{"train_size": 64, "test_size": 16, **overrides})


def run_cli(argv, capsys):
    """``(exit code, stderr)`` of ``python -m rgkern`` with ``argv``."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    return code, capsys.readouterr().err


CLI_TINY = ["train", "--preset", "tiny", "--steps", "2", "--num-samples", "4", "--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------- flips
def test_flip_mask_is_a_pure_function_of_step_and_seed():
    first = flip_mask(5, 64, seed=3)
    assert first.dtype == torch.bool and first.shape == (64,)
    assert torch.equal(first, flip_mask(5, 64, seed=3))
    assert not torch.equal(first, flip_mask(6, 64, seed=3))
    assert not torch.equal(first, flip_mask(5, 64, seed=4))
    draws = torch.stack([flip_mask(step, 64, seed=0) for step in range(200)]).float()
    assert abs(draws.mean().item() - 0.5) < 0.01  # 12,800 fair coins: std 0.0044


def test_hflip_flips_the_drawn_images_of_each_batch(tmp_path, images, monkeypatch):
    run = trainer(tiny(hflip=True, seed=2), images, tmp_path / "run")
    seen = []

    # Capture the batches without training: stop in loss() with a sentinel.
    class Captured(Exception):
        pass

    def capture(self, batch):
        seen.append(batch.clone())
        raise Captured

    monkeypatch.setattr(Trainer, "loss", capture)
    for step in range(3):
        run.step = step
        with pytest.raises(Captured):
            run.train_step()
        drawn = images[0][batch_indices(step, 64, 16, seed=2)]
        flip = flip_mask(step, 16, seed=2)
        assert 0 < int(flip.sum()) < 16
        assert torch.equal(seen[-1][flip], drawn[flip].flip(-1))
        assert torch.equal(seen[-1][~flip], drawn[~flip])


def test_hflip_changes_the_run_and_resumes_bit_identically(tmp_path, images):
    straight = trainer(tiny(hflip=True, steps=4, eval_every=2, checkpoint_every=100), images, tmp_path / "straight")
    straight.fit(progress=False)
    first = trainer(tiny(hflip=True, steps=2, eval_every=2, checkpoint_every=100), images, tmp_path / "split")
    first.fit(progress=False)
    second = trainer(tiny(hflip=True, steps=4, eval_every=2, checkpoint_every=100), images, tmp_path / "split")
    second.resume()
    second.fit(progress=False)
    assert_same_state(straight.model, second.model)
    assert [e["test_bpd"] for e in straight.history] == [e["test_bpd"] for e in second.history]
    unflipped = trainer(tiny(steps=4, eval_every=2, checkpoint_every=100), images, tmp_path / "plain")
    unflipped.fit(progress=False)
    differs = [k for k, v in unflipped.model.state_dict().items() if not torch.equal(v, straight.model.state_dict()[k])]
    assert differs  # the flips reach the training data
    with pytest.raises(ValueError, match="hflip"):
        trainer(tiny(steps=6), images, tmp_path / "split").resume()


# ----------------------------------------------------------------------------- float64
def test_float64_training_runs_model_data_and_loss_in_float64(tmp_path, images):
    config = tiny(dtype="float64", steps=3, eval_every=3, checkpoint_every=3)
    run = trainer(config, images, tmp_path / "run")
    losses = [run.train_step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert {p.dtype for p in run.model.parameters()} == {torch.float64}
    assert all(t.dtype == torch.float64 for s in run.optimizer.state.values() for k, t in s.items() if k != "step")
    # The loss of one batch, from a copy of the noise generator, against the same computation
    # by hand in float64: equal. The model has trained 3 steps, so it is not the identity.
    batch = images[0][:16]
    generator = torch.Generator().set_state(run.noise_generator.get_state())
    loss = run.loss(batch)
    assert loss.dtype == torch.float64
    y, logdet = preprocess(batch, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        by_hand = bits_per_dim(run.model.log_prob(y), logdet, run.model.num_dims).mean()
    assert loss.item() == by_hand.item()
    # The same weights in float32 give a (slightly) different figure: float64 is really used.
    single = build_model(config, 32, 3).float()
    single.load_state_dict(run.model.state_dict())
    with torch.no_grad():
        in_float32 = bits_per_dim(single.log_prob(y.float()), logdet.float(), single.num_dims).mean().item()
    assert in_float32 != by_hand.item() and abs(in_float32 - by_hand.item()) < 1e-4 * abs(by_hand.item())


def test_float64_runs_follow_float32_runs_and_checkpoints_stay_float64(tmp_path, images):
    losses = {}
    for dtype in ("float32", "float64"):
        run = trainer(tiny(dtype=dtype, steps=4), images, tmp_path / dtype)
        losses[dtype] = [run.train_step() for _ in range(4)]
    for a, b in zip(losses["float32"], losses["float64"]):
        assert a == pytest.approx(b, rel=1e-3)
    out = tmp_path / "run"
    result = train(tiny(dtype="float64", steps=2, eval_every=2, checkpoint_every=2), out, progress=False, log=quiet)
    model = load_model(out / CHECKPOINT_NAME)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert_same_state(model, result.model)
    assert evaluate_bpd(model, images[1]) == result.test_bpd
    with pytest.raises(ValueError, match="dtype"):
        train(tiny(steps=4), out, resume=True, progress=False, log=quiet)


def test_dtype_and_flag_settings_are_checked():
    with pytest.raises(ValueError, match="dtype must be one of float32, float64, got 'float16'"):
        tiny(dtype="float16")
    with pytest.raises(ValueError, match="bf16 autocast is for float32 models"):
        tiny(dtype="float64", bf16=True)
    with pytest.raises(ValueError, match="hflip must be True or False, got 1"):
        tiny(hflip=1)
    with pytest.raises(ValueError, match="grad_clip must be a finite number >= 0"):
        tiny(grad_clip=-1.0)


# ----------------------------------------------------------------------------- clipping
def test_clip_norm_zero_turns_clipping_off(tmp_path, images):
    states = {}
    for clip in (0.0, 1e9, 1e-3):
        run = trainer(tiny(grad_clip=clip), images, tmp_path / f"clip{clip}")
        run.train_step()
        run.train_step()
        states[clip] = run.model
    assert_same_state(states[0.0], states[1e9])  # 0: no clipping, as an unreachable bound
    assert any(not torch.equal(a, b) for a, b in zip(states[0.0].parameters(), states[1e-3].parameters()))


# ----------------------------------------------------------------------------- resume settings
def test_resume_config_takes_the_saved_run_with_overrides():
    saved = tiny(model={"hidden": 6, "n_layers": [1, 2, 1, 1]}, hflip=True, dtype="float64", compile=True).to_dict()
    saved.pop("hflip")  # as a run written before the setting existed ... then it is the default
    config = resume_config(saved, steps=99, model={"n_res": 2}, device=None)
    assert config.steps == 99 and config.hflip is False and config.dtype == "float64"
    assert config.model["hidden"] == 6 and config.model["n_layers"] == [1, 2, 1, 1] and config.model["n_res"] == 2
    assert config.compile is False and config.device is None  # settings of the session, not of the run
    with pytest.raises(ValueError, match="unknown training settings"):
        resume_config(saved, learning_rate=1.0)


def test_resume_of_a_checkpoint_that_predates_the_new_settings(tmp_path, images):
    out = tmp_path / "run"
    train(tiny(steps=2, eval_every=2, checkpoint_every=2), out, progress=False, log=quiet)
    state = load_checkpoint(out / CHECKPOINT_NAME)
    for key in ("hflip", "dtype"):
        state["info"]["train_config"].pop(key)
    run = trainer(tiny(steps=2), images, tmp_path / "unused")
    load_checkpoint(out / CHECKPOINT_NAME, run.model, run.optimizer)
    save_checkpoint(out / CHECKPOINT_NAME, run.model, run.optimizer, step=2, info=state["info"], extra_tensors=state["extra_tensors"])
    result = train(tiny(steps=3, eval_every=2, checkpoint_every=2), out, resume=True, progress=False, log=quiet)
    assert [e["step"] for e in result.history] == [0, 2, 3]


def test_a_run_saved_with_the_former_single_sample_temperature_resumes_with_it(tmp_path, images, capsys):
    out = tmp_path / "run"
    code, err = run_cli(CLI_TINY + ["--out", str(out)], capsys)
    assert code == 0, err
    state = load_checkpoint(out / CHECKPOINT_NAME)
    saved = state["info"]["train_config"]
    assert "sample_temperature" not in saved
    saved["sample_temperature"] = 0.8  # as saved before it was folded into sample_temperatures (it applied instead)
    run = trainer(tiny(steps=2), images, tmp_path / "unused")
    load_checkpoint(out / CHECKPOINT_NAME, run.model, run.optimizer)
    save_checkpoint(out / CHECKPOINT_NAME, run.model, run.optimizer, step=2, info=state["info"], extra_tensors=state["extra_tensors"])
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "3", "--num-samples", "4", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert list(json.loads((out / "history.json").read_text())[-1]["quality"]) == ["0.8"]
    resumed = read_document(out / CHECKPOINT_NAME)["info"]["train_config"]
    assert resumed["sample_temperatures"] == [0.8] and "sample_temperature" not in resumed


# ----------------------------------------------------------------------------- learning-rate schedules
def test_learning_rate_schedules():
    constant = tiny(lr=0.02, steps=100)
    assert [learning_rate(constant, s) for s in (0, 50, 99)] == [0.02] * 3
    warm = tiny(lr=0.02, steps=100, warmup_steps=4)
    assert [learning_rate(warm, s) for s in range(6)] == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02, 0.02])
    cosine = tiny(lr=0.02, steps=104, warmup_steps=4, lr_schedule="cosine")
    rates = [learning_rate(cosine, s) for s in range(104)]
    assert rates[:5] == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02])
    assert rates[54] == pytest.approx(0.01)  # half way through the decay
    assert all(a > b > 0 for a, b in zip(rates[4:], rates[5:]))  # falls every step, never to 0 within the run
    assert rates[-1] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    wsd = tiny(lr=0.02, steps=104, warmup_steps=4, lr_schedule="wsd", decay_steps=10)
    rates = [learning_rate(wsd, s) for s in range(104)]
    assert rates[:5] == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02])
    assert rates[4:95] == [0.02] * 91  # stable until the last 10 updates
    assert rates[94:] == pytest.approx([0.02 * (10 - i) / 10 for i in range(10)])  # then linear, down to lr / 10


def test_schedule_settings_are_checked():
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, wsd, got 'linear'"):
        tiny(lr_schedule="linear")
    with pytest.raises(ValueError, match=r"'wsd' needs 1 <= decay_steps <= steps - warmup_steps = 96, got decay_steps 0"):
        tiny(lr_schedule="wsd", steps=100, warmup_steps=4)
    with pytest.raises(ValueError, match=r"'wsd' needs 1 <= decay_steps <= steps - warmup_steps = 96, got decay_steps 97"):
        tiny(lr_schedule="wsd", steps=100, warmup_steps=4, decay_steps=97)
    with pytest.raises(ValueError, match="lr_schedule is 'cosine', so it must be 0, got 5"):
        tiny(lr_schedule="cosine", decay_steps=5)
    with pytest.raises(ValueError, match="decay_steps must be an int >= 0, got -1"):
        tiny(decay_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        tiny(warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got 2.5"):
        tiny(warmup_steps=2.5)


def test_the_optimiser_uses_the_schedule_and_a_resumed_run_follows_it(tmp_path, images):
    config = tiny(steps=6, eval_every=2, checkpoint_every=100, lr=0.01, lr_schedule="cosine", warmup_steps=2)
    straight = trainer(config, images, tmp_path / "straight")
    seen = []
    step = straight.optimizer.step

    def spy():
        seen.append(straight.optimizer.param_groups[0]["lr"])
        return step()

    straight.optimizer.step = spy
    straight.fit(progress=False)
    assert seen == [learning_rate(config, s) for s in range(6)]
    assert seen[:3] == pytest.approx([0.005, 0.01, 0.01]) and seen[2] > seen[3] > seen[4] > seen[5] > 0
    assert [e["lr"] for e in straight.history] == [learning_rate(config, s) for s in (0, 1, 3, 5)]

    # The same run stopped (by a time limit) after its first update and resumed: bit-identical
    # (the schedule is a pure function of the step) ...
    first = trainer(config, images, tmp_path / "split")
    first.fit(progress=False, time_limit=0)
    assert first.step == 1
    second = trainer(config, images, tmp_path / "split")
    second.resume()
    second.fit(progress=False)
    assert second.step == 6
    assert_same_state(straight.model, second.model)
    # ... and resuming it with another schedule is refused.
    with pytest.raises(ValueError, match="lr_schedule"):
        trainer(tiny(steps=6, eval_every=2, checkpoint_every=100, lr=0.01, warmup_steps=2), images, tmp_path / "split").resume()


# ----------------------------------------------------------------------------- CLI
def test_model_and_optimiser_flags_reach_the_config_and_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = CLI_TINY + [
        "--out", str(out), "--n-layers", "1,2,1,1", "--hidden", "6", "--n-res", "2", "--n-mlp", "1,0,1,0",
        "--prior", "gaussian", "--weight-decay", "0.25", "--clip-norm", "0", "--dtype", "float64", "--hflip",
        "--lr-schedule", "wsd", "--warmup-steps", "1", "--decay-steps", "1",
    ]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    model = load_model(out / CHECKPOINT_NAME)
    assert model.config["n_layers"] == (1, 2, 1, 1) and model.config["hidden"] == (6,) * 4
    assert model.config["n_res"] == (2,) * 4 and model.config["n_mlp"] == (1, 0, 1, 0) and model.config["prior"] == "gaussian"
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    saved = read_document(out / CHECKPOINT_NAME)["info"]["train_config"]
    assert saved["weight_decay"] == 0.25 and saved["grad_clip"] == 0.0 and saved["hflip"] is True and saved["dtype"] == "float64"
    assert saved["lr_schedule"] == "wsd" and saved["warmup_steps"] == 1 and saved["decay_steps"] == 1
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["model"].config == model.config
    # --resume with none of the flags continues the same run ...
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "3", "--num-samples", "4", "--no-progress"], capsys)
    assert code == 0, err
    resumed = load_checkpoint(out / CHECKPOINT_NAME)
    assert resumed["step"] == 3 and resumed["model"].config == model.config
    assert resumed["info"]["train_config"] == {**saved, "steps": 3, "device": None}  # the device is the session's
    # ... and with a flag that differs it is refused, naming the difference.
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "4", "--hidden", "7", "--no-progress"], capsys)
    assert code == 2 and "different model config" in err and "hidden" in err
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "4", "--preset", "cpu", "--no-progress"], capsys)
    assert code == 2 and "--preset cpu differs from the preset of the run" in err and "'tiny'" in err


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--n-layers", "8,6,x"], "--n-layers must be an int or comma-separated ints, one per RG level (e.g. 8,6,4,2), got '8,6,x'"),
        (["--hidden", "-4"], "--hidden entries must be >= 1, got '-4'"),
        (["--n-res", "2,0,2,2"], "--n-res entries must be >= 1, got '2,0,2,2'"),
        (["--n-mlp", ""], "--n-mlp must be an int or comma-separated ints"),
        (["--n-layers", "1,1,1"], "n_layers has 3 entries (1, 1, 1), but image_size=32 with kernel_size=4 has 4 RG levels"),
        (["--hidden", "4,4"], "hidden has 2 entries (4, 4), expected one per RG level (4 levels)"),
        (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1.0"),
        (["--clip-norm", "inf"], "grad_clip must be a finite number >= 0, got inf"),
        (["--lr-schedule", "wsd"], "lr_schedule 'wsd' needs 1 <= decay_steps <= steps - warmup_steps = 2, got decay_steps 0"),
        (["--decay-steps", "-1"], "argument --decay-steps: expected an integer >= 0 (at most 2**62), got '-1'"),
        (["--dtype", "float64", "--bf16"], "bf16 autocast is for float32 models"),
        (["--lr-schedule", "linear"], "argument --lr-schedule: invalid choice: 'linear'"),
        (["--warmup-steps", "-3"], "argument --warmup-steps: expected an integer >= 0 (at most 2**62), got '-3'"),
    ],
)
def test_bad_model_flags_are_one_line_errors(tmp_path, capsys, flags, fragment):
    code, err = run_cli(CLI_TINY + ["--out", str(tmp_path / "run")] + flags, capsys)
    lines = [line for line in err.splitlines() if line.startswith("rgkern train: error:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_variant_and_init_flags_reach_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(CLI_TINY + ["--out", str(out), "--variant", "authors", "--init", "torch"], capsys)
    assert code == 0, err
    model = load_model(out / CHECKPOINT_NAME)
    # The variant is part of the function (model.config); the initialisation only of the run.
    assert model.config["variant"] == "authors" and "init" not in model.config
    saved = read_document(out / CHECKPOINT_NAME)["info"]["train_config"]
    assert saved["model"]["variant"] == "authors" and saved["model"]["init"] == "torch"
    reference = build_model(tiny(model={"variant": "authors", "init": "torch"}), 32, 3)
    assert reference.variant == "authors" and reference.init == "torch"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    # The init flag is not a no-op: the authors' initialisation gives other weights.
    other = build_model(tiny(model={"variant": "authors", "init": "authors"}), 32, 3)
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), other.parameters()))
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "3", "--num-samples", "4", "--no-progress"], capsys)
    assert code == 0, err
    assert load_model(out / CHECKPOINT_NAME).config == model.config
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", "4", "--variant", "paper", "--no-progress"], capsys)
    assert code == 2 and "variant" in err
    code, err = run_cli(CLI_TINY + ["--out", str(tmp_path / "bad"), "--variant", "mine"], capsys)
    assert code == 2 and "'mine'" in err


def test_mnist_and_celeba_through_the_train_command(tmp_path, capsys):
    from test_data_celeba_mnist import _digits, _face, _idx_bytes, _write, _write_jpeg

    mnist = tmp_path / "mnist"
    _write(mnist / "train-images-idx3-ubyte.gz", _idx_bytes(_digits(20, 1)), compress=True)
    _write(mnist / "t10k-images-idx3-ubyte.gz", _idx_bytes(_digits(4, 2)), compress=True)
    out = tmp_path / "mnist_run"
    code, err = run_cli(CLI_TINY + ["--out", str(out), "--data", "mnist", "--data-root", str(mnist), "--train-size", "16", "--test-size", "4"], capsys)
    assert code == 0, err
    model = load_model(out / CHECKPOINT_NAME)
    assert model.channels == 1 and model.image_size == 32
    history = json.loads((out / "history.json").read_text())
    assert all(math.isfinite(e["test_bpd"]) for e in history)
    celeba = tmp_path / "celeba"
    for i in range(20):
        _write_jpeg(celeba / "img_align_celeba" / f"{i + 1:06d}.jpg", _face(i))
    out = tmp_path / "celeba_run"
    code, err = run_cli(CLI_TINY + ["--out", str(out), "--data", "celeba", "--data-root", str(celeba), "--train-size", "16", "--test-size", "2", "--hflip"], capsys)
    assert code == 0, err
    assert load_model(out / CHECKPOINT_NAME).channels == 3
    assert read_document(out / CHECKPOINT_NAME)["info"]["train_config"]["data"] == "celeba"
    code, err = run_cli(CLI_TINY + ["--out", str(tmp_path / "x"), "--data", "celeba"], capsys)
    assert code == 2 and "needs root" in err
