"""IncrementalEncoder / IncrementalDecoder against full passes (float64, random tiny models)."""
import pytest
import torch

from rgkern.locality.incremental import IncrementalDecoder, IncrementalEncoder
from rgkern.locality.region import decode_region

from utils import random_images, tiny_model


def images(model, batch=2, seed=1):
    return random_images(model, batch, seed)


def random_model(L, k, C, n_layers=1, dtype=torch.float64, seed=0, backend="torch", variant="paper"):
    return tiny_model(L, C, k, dtype=dtype, seed=seed, n_layers=n_layers, backend=backend, variant=variant)


def regions(L, seed=0):
    """Single pixel, rectangle, scattered mask, regions wrapping the periodic boundary."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    m = torch.zeros(L, L, dtype=torch.bool)
    m[L // 2 + 1, L // 4] = True
    out["pixel"] = m
    m = torch.zeros(L, L, dtype=torch.bool)
    m[1 : 1 + L // 4, L // 2 : L // 2 + 3] = True
    out["rectangle"] = m
    out["scattered"] = torch.rand(L, L, generator=g) < 3.0 / L**1.5
    m = torch.zeros(L, L, dtype=torch.bool)
    m[[-1, -1, 0, 0], [-1, 0, -1, 0]] = True
    out["corner"] = m
    m = torch.zeros(L, L, dtype=torch.bool)
    m[L // 2 : L // 2 + 2, [-2, -1, 0, 1]] = True
    out["edge"] = m
    return out


def latent_sets(L, seed=0):
    """Latent masks whose generation cones stay local: low RG levels, one wrapping the boundary."""
    coords = torch.arange(L)
    level0 = (coords[:, None] % 2 == 1) | (coords[None, :] % 2 == 1)  # RG level 0: an odd coordinate
    g = torch.Generator().manual_seed(seed)
    out = {}
    m = torch.zeros(L, L, dtype=torch.bool)
    m[L // 2 + 1, L // 4 + 1] = True
    out["one level-0 latent"] = m
    low = level0.flatten().nonzero().flatten()
    m = torch.zeros(L * L, dtype=torch.bool)
    m[low[torch.randperm(len(low), generator=g)[:3]]] = True
    out["scattered level-0"] = m.view(L, L)
    m = torch.zeros(L, L, dtype=torch.bool)
    m[[-1, -1, 1], [-1, 1, -1]] = True
    out["wrapping level-0"] = m
    m = torch.zeros(L, L, dtype=torch.bool)
    m[2, 6 % L] = True
    out["one level-1 latent"] = m
    return out


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def change(x, region, seed=5):
    g = torch.Generator().manual_seed(seed)
    x_new = x.clone()
    x_new[:, :, region] = torch.randn(x_new[:, :, region].shape, generator=g, dtype=torch.float64).to(x.dtype)
    return x_new


CONFIGS = [(8, 2, 1, 2), (8, 4, 3, 1), (16, 4, 2, 2), (16, 2, 1, 1), (32, 4, 3, 1)]


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("L,k,C,n_layers", CONFIGS)
def test_encoder_update_equals_full_encode(L, k, C, n_layers, variant):
    model = random_model(L, k, C, n_layers, variant=variant)
    geometry = model.geometry
    x = images(model)
    inc = IncrementalEncoder(model, x)
    z_first, logdet_first = model.encode(x)
    assert torch.equal(inc.z, z_first) and torch.equal(inc.logdet, logdet_first)
    for name, region in regions(L).items():
        z_before = inc.z
        x_new = change(inc.x, region)
        z = inc.update(x_new, region)
        z_full, logdet_full = model.encode(x_new)
        assert relative_error(z, z_full) < 1e-12, name
        assert relative_error(inc.logdet, logdet_full) < 1e-12, name
        cone = geometry.inference_cone(region)
        assert torch.equal(z[:, :, ~cone], z_before[:, :, ~cone]), name
        assert not torch.equal(z[:, :, cone], z_before[:, :, cone]), name
        expected = sum(len(p) for p in geometry.inference_patches(region))
        assert inc.last_patch_evals == expected, name
        assert inc.last_update_was_full == (expected == inc.total_patches), name
    # The cache is consistent after the sequence: one more update against a fresh encoder.
    region = regions(L, seed=1)["scattered"] | regions(L)["pixel"]
    x_new = change(inc.x, region, seed=9)
    torch.testing.assert_close(inc.update(x_new, region), IncrementalEncoder(model, x_new).z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("L,k,C,n_layers", CONFIGS)
def test_decoder_update_equals_full_decode(L, k, C, n_layers, variant):
    model = random_model(L, k, C, n_layers, variant=variant)
    geometry = model.geometry
    z = images(model, seed=2)
    dec = IncrementalDecoder(model, z)
    assert torch.equal(dec.x, model.decode(z))
    torch.testing.assert_close(dec.logdet, -model.encode(dec.x)[1], rtol=1e-10, atol=1e-10)
    for name, latents in latent_sets(L).items():
        x_before = dec.x
        z_new = change(dec.z, latents)
        x = dec.update(z_new, latents)
        assert relative_error(x, model.decode(z_new)) < 1e-12, name
        cone = geometry.generation_cone(latents)
        assert torch.equal(x[:, :, ~cone], x_before[:, :, ~cone]), name
        expected = sum(len(p) for p in geometry.generation_patches(latents))
        assert dec.last_patch_evals == expected, name
        assert dec.last_update_was_full == (expected == dec.total_patches), name
    torch.testing.assert_close(dec.logdet, -model.encode(dec.x)[1], rtol=1e-10, atol=1e-10)


def test_float32_update_matches_encode_to_float32_tolerance():
    model = random_model(16, 4, 3, dtype=torch.float32)
    x = images(model)
    inc = IncrementalEncoder(model, x)
    region = regions(16)["rectangle"]
    x_new = change(x, region)
    z = inc.update(x_new, region)
    z_full, logdet_full = model.encode(x_new)
    torch.testing.assert_close(z, z_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inc.logdet, logdet_full, rtol=1e-5, atol=1e-4)
    assert inc.logdet.dtype == torch.float32


def test_empty_region_returns_cached_latents_without_work():
    model = random_model(8, 4, 2)
    x = images(model)
    inc = IncrementalEncoder(model, x)
    z = inc.update(x.clone(), torch.zeros(8, 8, dtype=torch.bool))
    assert inc.last_patch_evals == 0 and not inc.last_update_was_full
    assert torch.equal(z, model.encode(x)[0])
    z.add_(1.0)  # the returned tensor is not the cache
    assert torch.equal(inc.z, model.encode(x)[0])


def test_region_whose_dirty_set_covers_every_patch_runs_a_full_pass():
    model = random_model(8, 4, 1)
    x = images(model)
    inc = IncrementalEncoder(model, x)
    # One pixel in each of the four level-0 disentangler patches: every later patch is dirty.
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[[2, 2, 6, 6], [2, 6, 2, 6]] = True
    x_new = change(x, region)
    z = inc.update(x_new, region)
    assert inc.last_update_was_full and inc.last_patch_evals == inc.total_patches == 10
    assert torch.equal(z, model.encode(x_new)[0]) and torch.equal(inc.logdet, model.encode(x_new)[1])
    everything = torch.ones(8, 8, dtype=torch.bool)
    x_new = change(x_new, everything, seed=11)
    inc.update(x_new, everything)
    assert inc.last_update_was_full and inc.last_patch_evals == 10
    # The next small update is incremental again.
    pixel = regions(8)["pixel"]
    z = inc.update(change(x_new, pixel), pixel)
    assert not inc.last_update_was_full and inc.last_patch_evals < 10


def test_weight_change_rebuilds_the_cache():
    model = random_model(16, 4, 1)
    x = images(model)
    inc = IncrementalEncoder(model, x)
    region = regions(16)["pixel"]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model.log_prob(x).sum().backward()
    optimiser.step()
    x_new = change(x, region)
    z = inc.update(x_new, region)
    assert inc.last_update_was_full
    assert torch.equal(z, model.encode(x_new)[0])
    # An in-place edit under no_grad is seen too.
    with torch.no_grad():
        model.sublayers[0].networks.t_scale.mul_(2)
    x_new = change(x_new, region, seed=6)
    inc.update(x_new, region)
    assert inc.last_update_was_full
    # Writes through .data bypass the version counter: rebuild() by hand.
    model.sublayers[-1].networks.s_scale.data[1].mul_(3)
    inc.rebuild()
    x_new = change(x_new, region, seed=7)
    z = inc.update(x_new, region)
    assert not inc.last_update_was_full
    torch.testing.assert_close(z, model.encode(x_new)[0], rtol=1e-12, atol=1e-12)


def test_interrupted_update_leads_to_a_full_pass_next_time():
    model = random_model(16, 4, 1)
    x = images(model)
    inc = IncrementalEncoder(model, x)
    region = regions(16)["rectangle"]

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    model.sublayers[3].transform_rows = broken
    with pytest.raises(KeyboardInterrupt):
        inc.update(change(x, region), region)
    del model.sublayers[3].transform_rows
    x_new = change(x, region, seed=12)
    z = inc.update(x_new, region, check_region=False)
    assert inc.last_update_was_full
    assert torch.equal(z, model.encode(x_new)[0])
    x_next = change(x_new, region, seed=13)
    inc.update(x_next, region)
    assert not inc.last_update_was_full
    torch.testing.assert_close(inc.z, model.encode(x_next)[0], rtol=1e-12, atol=1e-12)


def test_evaluate_is_differentiable_and_equals_full_log_prob():
    model = random_model(16, 4, 2, n_layers=2)
    x = images(model)
    inc = IncrementalEncoder(model, x)
    region = regions(16)["corner"] | regions(16)["rectangle"]
    repeats = 3
    g = torch.Generator().manual_seed(8)
    values = torch.randn(x.shape[0] * repeats, 2, int(region.sum()), generator=g, dtype=torch.float64, requires_grad=True)
    result = inc.evaluate(values, region)
    assert result.patch_evals == sum(len(p) for p in model.geometry.inference_patches(region))
    assert torch.equal(result.positions.cpu(), model.geometry.inference_cone(region).flatten().nonzero().flatten())
    (grad,) = torch.autograd.grad(result.log_prob.sum(), values)

    full_values = values.detach().clone().requires_grad_(True)
    x_new = fill(x.repeat_interleave(repeats, dim=0), region, full_values)
    expected = model.log_prob(x_new)
    (expected_grad,) = torch.autograd.grad(expected.sum(), full_values)
    torch.testing.assert_close(result.log_prob, expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
    z_full, logdet_full = model.encode(x_new)
    torch.testing.assert_close(result.z, z_full.flatten(2)[:, :, result.positions], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.logdet, logdet_full, rtol=1e-12, atol=1e-10)
    assert torch.equal(inc.x, x)  # the cache is untouched


def fill(x, region, values):
    """``x`` with the pixels of ``region`` set to ``values (B, C, n)``, differentiably."""
    flat = x.flatten(2)
    positions = region.flatten().nonzero().flatten()
    return flat.index_copy(2, positions, values).view_as(x)


def test_decode_region_equals_full_decode_and_its_gradient():
    model = random_model(16, 4, 2, n_layers=2)
    z = images(model, seed=3).requires_grad_(True)
    region = regions(16)["edge"]
    values = decode_region(model, z, region)
    expected = model.decode(z)[:, :, region]
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(values.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((values * weights).sum(), z)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), z)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
    cone = model.geometry.inference_cone(region)
    assert float(grad[:, :, ~cone].abs().max()) == 0.0


def test_plans_built_in_inference_mode_serve_autograd_later():
    model = random_model(8, 4, 1)
    x = images(model)
    region = regions(8)["rectangle"]
    with torch.inference_mode():
        inc = IncrementalEncoder(model, x)
        inc.update(change(x, region), region)
    inc = IncrementalEncoder(model, x)
    values = torch.zeros(2, 1, int(region.sum()), dtype=torch.float64, requires_grad=True)
    inc.evaluate(values, region).log_prob.sum().backward()
    assert values.grad is not None


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def encoder():
    model = random_model(8, 4, 2)
    return IncrementalEncoder(model, images(model))


def test_region_of_wrong_shape(encoder):
    x = encoder.x
    with pytest.raises(ValueError, match=r"region must have shape \(8, 8\), got \(8, 4\)"):
        encoder.update(x, torch.zeros(8, 4, dtype=torch.bool))


@pytest.mark.parametrize("region", [torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.uint8), [[True] * 8] * 8])
def test_region_of_wrong_type(encoder, region):
    with pytest.raises(TypeError, match="region"):
        encoder.update(encoder.x, region)


def test_x_new_of_wrong_shape_dtype_or_type(encoder):
    region = torch.zeros(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x_new has shape \(1, 2, 8, 8\), expected the cached shape \(2, 2, 8, 8\)"):
        encoder.update(encoder.x[:1], region)
    with pytest.raises(TypeError, match="float32.*float64"):
        encoder.update(encoder.x.float(), region)
    with pytest.raises(TypeError, match="ndarray"):
        encoder.update(encoder.x.numpy(), region)


def test_change_outside_region_is_caught(encoder):
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[0, 0] = True
    x_new = encoder.x
    x_new[1, 1, 3, 5] += 1.0
    with pytest.raises(ValueError, match=r"outside region.*\(3, 5\)"):
        encoder.update(x_new, region)
    encoder.update(x_new, region, check_region=False)  # the caller's promise is taken
    assert encoder.last_patch_evals > 0


def test_non_finite_values_in_region(encoder):
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2, 3] = True
    x_new = encoder.x
    x_new[0, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encoder.update(x_new, region)


def test_constructor_checks_its_image():
    model = random_model(8, 4, 2)
    with pytest.raises(ValueError, match="channels"):
        IncrementalEncoder(model, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        IncrementalEncoder(model, torch.full((1, 2, 8, 8), float("inf"), dtype=torch.float64))
    decoder = IncrementalDecoder(model, images(model))
    with pytest.raises(ValueError, match=r"latents must have shape \(8, 8\)"):
        decoder.update(decoder.z, torch.zeros(4, 4, dtype=torch.bool))


def test_evaluate_checks_values(encoder):
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[1, 1:3] = True
    with pytest.raises(ValueError, match=r"\(B \* R, 2, 2\)"):
        encoder.evaluate(torch.zeros(3, 2, 2, dtype=torch.float64), region)
    with pytest.raises(ValueError, match="empty"):
        encoder.evaluate(torch.zeros(2, 2, 0, dtype=torch.float64), torch.zeros(8, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------- Triton path
def test_triton_backend_update_matches_torch():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(8, 4, 1, dtype=torch.float32, backend="triton").to(device)
    x = images(model).to(device)
    inc = IncrementalEncoder(model, x)
    region = regions(8)["rectangle"]
    x_new = change(x.cpu(), region).to(device)
    z = inc.update(x_new, region)
    model.backend = "torch"
    z_torch, logdet_torch = model.encode(x_new.cpu().to(device) if device == "cpu" else x_new)
    torch.testing.assert_close(z, z_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inc.logdet, logdet_torch, rtol=1e-4, atol=1e-4)
