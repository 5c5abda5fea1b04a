"""The reference RGFlow: invertibility, exact log-det, priors, sampling, bad input."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import rgkern
from rgkern.tools.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from utils import random_images, tiny_model


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("L,k,C", [(8, 4, 1), (8, 2, 3), (16, 4, 3), (16, 2, 1), (32, 4, 3)])
def test_float64_round_trip(L, k, C, variant):
    model = tiny_model(L, C, k, n_layers=2, variant=variant)
    x = random_images(model)
    z, logdet = model.encode(x)
    assert z.shape == x.shape and logdet.shape == (3,)
    assert not torch.allclose(z, x)  # the couplings are not the identity
    x_back = model.decode(z)
    assert (x_back - x).abs().max() / x.abs().max() < 1e-10


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("L,k,C", [(8, 4, 1), (8, 2, 1), (4, 2, 2)])
def test_logdet_equals_jacobian_logdet(L, k, C, variant):
    model = tiny_model(L, C, k, n_layers=2, variant=variant)
    x = random_images(model, batch=2)
    _, logdet = model.encode(x)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: model.encode(v.view(1, C, L, L))[0].flatten(), x[b].flatten())
        sign, expected = torch.linalg.slogdet(jac)
        assert sign > 0
        assert abs(logdet[b].item() - expected.item()) < 1e-8
    assert logdet.abs().min() > 1e-3  # a non-trivial log-det


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_log_prob_is_prior_plus_logdet_in_closed_form(prior):
    model = tiny_model(8, 1, 4, prior=prior)
    x = random_images(model)
    z, logdet = model.encode(x)
    if prior == "laplace":
        b = 1 / math.sqrt(2)
        expected = (-math.log(2 * b) - z.abs() / b).flatten(1).sum(1)
    else:
        expected = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected + logdet, rtol=1e-12, atol=1e-12)


def test_laplace_prior_variance_is_temperature_squared():
    prior = rgkern.LaplacePrior()
    g = torch.Generator().manual_seed(0)
    z = prior.sample((200_000,), 0.7, generator=g, dtype=torch.float64)
    assert abs(z.var().item() - 0.49) < 0.01
    assert abs(z.abs().mean().item() - 0.7 / math.sqrt(2)) < 0.005


def test_sampling_before_training_leaves_geometry_usable_by_autograd():
    rgkern.get_geometry.cache_clear()  # a fresh geometry: its tables get built inside inference mode
    model = tiny_model(16, 2, 4)
    model.sample(1)
    model.log_prob(random_images(model)).sum().backward()  # raised "Inference tensors cannot be saved for backward"
    grads = [p.grad for p in model.parameters() if p.numel()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert not model.geometry.row_index(0).is_inference()


def test_sample_at_temperature_zero_is_decode_of_zero():
    model = tiny_model(8, 3, 4)
    x = model.sample(2, temperature=0.0)
    expected = model.decode(torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    assert torch.equal(x, expected)
    assert x.abs().max() > 0  # decode(0) is not zero for a non-identity model


def test_per_level_temperature_only_draws_latents_of_warm_levels():
    model = tiny_model(16, 1, 4)  # H = 3
    g = torch.Generator().manual_seed(0)
    z = model.sample_latents(4, temperature=[0.0, 1.0, 0.0], generator=g)
    levels = model.levels
    assert torch.all(z[:, :, levels != 1] == 0)
    assert torch.all(z[:, :, levels == 1] != 0)
    x = model.sample(4, temperature=[0.0, 1.0, 0.0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, model.decode(z))


def test_every_rnvp_block_starts_as_identity():
    torch.manual_seed(0)
    model = rgkern.RGFlow(16, 3, 4, n_layers=2, hidden=16, n_res=2, n_mlp=1).double()
    rows = torch.randn(10, 48, dtype=torch.float64)
    for sublayer in model.sublayers:
        out, logdet = sublayer.transform_rows(rows, inverse=False, backend="torch")
        assert torch.equal(out, rows)
        assert torch.equal(logdet, torch.zeros(10, dtype=torch.float64))


def test_bits_per_dim_bookkeeping_by_hand():
    images = torch.tensor([[[[0, 255], [128, 7]]]], dtype=torch.uint8)
    y, logdet = rgkern.preprocess(images, dequantize=False, dtype=torch.float64)
    total = 0.0
    for v in [0, 255, 128, 7]:
        p = 0.05 + 0.9 * (v + 0.5) / 256
        assert any(abs(math.log(p / (1 - p)) - t) < 1e-12 for t in y.flatten().tolist())
        total += math.log(0.9 / 256) - math.log(p) - math.log(1 - p)
    assert abs(logdet.item() - total) < 1e-12
    log_prob = torch.tensor([-3.0], dtype=torch.float64)
    bpd = rgkern.bits_per_dim(log_prob, logdet, 4)
    assert abs(bpd.item() - (3.0 - total) / (4 * math.log(2))) < 1e-12
    assert torch.equal(rgkern.postprocess(y), images)


def test_uniform_model_density_gives_eight_bits_per_dim():
    # A density uniform on [0, 256)^D in data space has exactly 8 bits/dim: check the
    # preprocessing log-det by putting the model density at minus the preprocess log-det
    # plus D*log(256) ... i.e. log p_data = -D log 256.
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y, logdet = rgkern.preprocess(images, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_prob_model = -48 * math.log(256.0) - logdet
    torch.testing.assert_close(rgkern.bits_per_dim(log_prob_model, logdet, 48), torch.full((5,), 8.0, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_gradients_reach_every_parameter(variant):
    model = tiny_model(8, 1, 4, n_layers=1, variant=variant)
    model.log_prob(random_images(model)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_float32_and_per_level_hyperparameters():
    model = tiny_model(16, 3, 4, dtype=torch.float32, n_layers=(1, 2, 1), hidden=(8, 16, 4), n_res=(1, 2, 1), n_mlp=(1, 0, 2))
    assert model.sublayers[2].num_blocks == 2
    assert [s.networks.n_res for s in model.sublayers] == [1, 1, 2, 2, 1, 1]
    x = random_images(model, batch=2)
    z, logdet = model.encode(x)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    assert (z - x).abs().max() > 0.1 and logdet.abs().min() > 1e-2  # not the identity
    assert (model.decode(z) - x).abs().max() / x.abs().max() < 1e-5


def test_auto_backend_uses_reference_on_cpu():
    assert rgkern.core.ops.resolve_backend("auto", torch.zeros(1)) == "torch"


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize("size", [12, 24, 40])
def test_image_size_not_k_times_power_of_two(size):
    with pytest.raises(ValueError, match=f"image size {size}"):
        rgkern.RGFlow(size, 3, 4, n_layers=1, hidden=8, n_res=1, n_mlp=1)


def test_wrong_channel_count_names_both():
    model = tiny_model(8, 3, 4)
    with pytest.raises(ValueError, match="1 channels.*expects 3"):
        model.encode(torch.randn(2, 1, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 1, 3, 8, 8), (8, 8)])
def test_non_4d_input(shape):
    model = tiny_model(8, 3, 4)
    with pytest.raises(ValueError, match="4-D"):
        model.encode(torch.randn(shape, dtype=torch.float64))


def test_wrong_spatial_size():
    model = tiny_model(8, 3, 4)
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(8, 8\)"):
        model.encode(torch.randn(1, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_to_encode(bad):
    model = tiny_model(8, 1, 4)
    x = random_images(model)
    x[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match="non-finite"):
        model.encode(x)


def test_wrong_dtype_is_a_type_error():
    model = tiny_model(8, 1, 4)
    with pytest.raises(TypeError, match="float32.*float64"):
        model.encode(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("temperature", [[1.0], [1.0, 1.0, 1.0], (0.5,) * 5])
def test_wrong_temperature_list_length(temperature):
    model = tiny_model(8, 1, 4)  # H = 2
    with pytest.raises(ValueError, match=f"{len(temperature)} entries.*2 levels"):
        model.sample(2, temperature=temperature)


def test_negative_temperature():
    with pytest.raises(ValueError, match="-1.0"):
        tiny_model(8, 1, 4).sample(1, temperature=-1.0)


def test_unknown_prior_and_backend():
    with pytest.raises(ValueError, match="'cauchy'.*laplace"):
        rgkern.RGFlow(8, 1, 4, prior="cauchy")
    with pytest.raises(ValueError, match="'cuda'.*auto"):
        rgkern.RGFlow(8, 1, 4, backend="cuda")


def test_n_layers_of_wrong_length():
    with pytest.raises(ValueError, match="n_layers has 4 entries"):
        rgkern.RGFlow(16, 1, 4, n_layers=(1, 1, 1, 1))


def test_a_sublayer_of_zero_blocks_is_the_identity_not_a_signal():
    """n_layers=0 killed the process with SIGFPE (a weight norm over zero rows); it is the identity.

    Run in a child process so that a signal fails the test instead of ending the suite."""
    script = textwrap.dedent("""
        import torch, rgkern
        x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        for n_layers in (0, (0, 1)):
            model = rgkern.RGFlow(8, 1, 4, n_layers=n_layers)
            z, logdet = model.encode(x)
            assert torch.isfinite(model.log_prob(x)).all() and model.sample(2).shape == (2, 1, 8, 8)
            if n_layers == 0:
                assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2)) and torch.equal(model.decode(z), x)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])


def test_finite_input_whose_latents_overflow_is_refused():
    """A finite image of 3e38 gave non-finite z and log-det without an error."""
    model = tiny_model(8, 1, 4, dtype=torch.float32)
    x = random_images(model).float()
    x[0] = 3e38
    with pytest.raises(ValueError, match=r"x is finite but its latents or log-det are not \(largest \|x\| = 3e\+38\)"):
        model.encode(x)
    with pytest.raises(ValueError, match="latents or log-det are not"):
        model.log_prob(x)
    model.check_inputs = False  # the documented switch: no check, no host sync
    assert not torch.isfinite(model.encode(x)[0]).all()


def test_checkpoint_round_trip_and_config_mismatch(tmp_path):
    model = tiny_model(8, 1, 4)
    path = save_checkpoint(tmp_path / "ckpt", model, step=7)
    fresh = tiny_model(8, 1, 4, seed=5)
    assert load_checkpoint(path, fresh)["step"] == 7
    x = random_images(model)
    torch.testing.assert_close(fresh.encode(x)[0], model.encode(x)[0], rtol=0, atol=0)
    other = tiny_model(8, 1, 4, n_layers=2)
    with pytest.raises(CheckpointError, match="different model config.*n_layers"):
        load_checkpoint(path, other)


def test_corrupt_checkpoint_names_file_and_is_left_alone(tmp_path):
    path = tmp_path / "broken.safetensors"
    payload = b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        rgkern.tools.checkpoint.load_model(path)
    assert path.read_bytes() == payload


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        rgkern.tools.checkpoint.load_model(tmp_path / "nope.safetensors")


def test_chunked_sampling_reproduces_one_big_batch():
    model = tiny_model(8, 3, 4)
    latents = model.sample_latents(10, 0.8, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(latents, torch.cat([model.sample_latents(n, 0.8, generator) for n in (3, 3, 4)]))
    whole = model.sample(10, 0.8, torch.Generator().manual_seed(3))
    chunked = model.sample(10, 0.8, torch.Generator().manual_seed(3), batch_size=3)
    # Same latents; the decoded images differ only by the BLAS blocking of other batch sizes.
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        model.sample(4, batch_size=0)


def test_temperature_map_defaults_to_the_model_device():
    model = tiny_model(16, 2, 4)
    table = model.temperature_map([0.1, 0.2, 0.3])
    assert table.shape == (2, 16, 16) and table.device == next(model.parameters()).device
    assert torch.equal(table[0], torch.tensor([0.1, 0.2, 0.3])[model.levels])


def test_public_api_of_design_section_6():
    for name in ("RGFlow", "IncrementalEncoder", "inpaint", "bits_per_dim", "preprocess", "postprocess"):
        assert callable(getattr(rgkern, name)), name


@pytest.mark.parametrize("config", [
    dict(image_size=8, channels=1, kernel_size=4, n_layers=1, hidden=8, n_res=2, n_mlp=1),
    dict(image_size=16, channels=3, kernel_size=2, n_layers=(0, 1, 2, 1), hidden=(4, 5, 6, 3), n_res=(1, 2, 1, 1), n_mlp=(0, 1, 2, 3)),
    dict(image_size=16, channels=3, kernel_size=4, n_layers=(2, 1, 1), hidden=8, n_res=2, n_mlp=2, variant="authors"),
    dict(),  # the paper's model: 201,295,360 weights
], ids=["small", "per-level", "authors", "paper"])
def test_weight_count_of_a_config_is_the_models(config):
    from rgkern.core.model import weight_count

    model = rgkern.RGFlow(**config)
    assert weight_count(model.config) == sum(p.numel() for p in model.parameters()) > 0
