"""The priors: Laplace sampling finite at both ends of the uniform draw, sums in the accumulator dtype."""
import math

import pytest
import torch

from rgkern.core.priors import GaussianPrior, LaplacePrior
from rgkern.locality import inpaint as inpaint_module
from rgkern.locality.inpaint import inpaint

from utils import random_images, tiny_model

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _largest_draw(dtype):
    """The largest value torch.rand returns in ``dtype``'s grid, ``1 - 2**-digits``."""
    return 1 - torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("end", ["zero", "largest"])
def test_laplace_sample_is_finite_at_both_ends_of_the_draw(monkeypatch, dtype, end):
    work = torch.float64 if dtype == torch.float64 else torch.float32
    value = 0.0 if end == "zero" else _largest_draw(work)
    forced = []

    def rand(shape, *args, dtype=None, **kwargs):
        forced.append(dtype)
        return torch.full(shape, value, dtype=dtype)

    monkeypatch.setattr(torch, "rand", rand)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])
    z = LaplacePrior().sample((3, 4), temperature, dtype=dtype)
    assert forced, "the sampler did not draw through torch.rand"
    assert z.dtype == dtype and bool(torch.isfinite(z).all())
    assert bool((z[:, 0] == 0).all())  # temperature 0: the point mass at zero, not 0 * inf
    # The extreme quantile: |z| = b * log(2**digits) with b = T / sqrt(2).
    digits = 53 if work == torch.float64 else 24
    expected = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64) / math.sqrt(2) * digits * math.log(2)
    sign = -1 if end == "zero" else 1
    rel = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    torch.testing.assert_close(z[0].double(), sign * expected, rtol=rel, atol=0)


def test_laplace_draws_are_symmetric_about_zero(monkeypatch):
    """Draw u and draw 1 - 2**-24 - u give opposite latents (the shifted grid is symmetric)."""
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    mirrored = (1 - 2.0**-24) - u
    draws = iter([u, mirrored])
    monkeypatch.setattr(torch, "rand", lambda shape, *a, **k: next(draws))
    prior = LaplacePrior()
    assert torch.equal(prior.sample((1000,), 1.0), -prior.sample((1000,), 1.0))


def test_laplace_sample_finite_in_1e8_draws_that_hit_the_boundary():
    """10**8 draws in chunks: about six of them are exactly 0, where the old ``u = rand - 1/2``
    sampler returned -inf; none is non-finite now."""
    generator = torch.Generator().manual_seed(2026)
    copy = torch.Generator().manual_seed(2026)
    prior = LaplacePrior()
    chunk, total, zeros, bad = 10**7, 10**8, 0, 0
    second_moment = 0.0
    for _ in range(total // chunk):
        zeros += int((torch.rand(chunk, generator=copy) == 0).sum())
        z = prior.sample((chunk,), 1.0, generator=generator)
        bad += int((~torch.isfinite(z)).sum())
        second_moment += float(z.double().square().sum())
    assert zeros >= 1, "no boundary draw in this stream: the test would not exercise the fix"
    assert bad == 0
    assert second_moment / total == pytest.approx(1.0, rel=1e-3)  # variance T**2


@pytest.mark.parametrize("prior", [LaplacePrior(), GaussianPrior()])
def test_sampled_variance_is_temperature_squared(prior):
    z = prior.sample((200_000,), 0.7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(z.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(z.var()) == pytest.approx(0.49, rel=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_log_prob_sums_the_prior_in_float32(dtype):
    """A bf16/fp16 model's log_prob is within 1e-4 of its own z and log-det summed in float64."""
    model = tiny_model(16, 3, 4, dtype=torch.float32, n_layers=2).to(dtype)
    x = random_images(model, batch=4)
    with torch.no_grad():
        log_prob = model.log_prob(x)
        z, logdet = model.encode(x)
    assert log_prob.dtype == torch.float32 and logdet.dtype == torch.float32
    exact = model.prior.log_prob(z.double()).flatten(1).sum(dim=1) + logdet.double()
    rel = ((log_prob.double() - exact).abs() / exact.abs()).max()
    assert rel < 1e-4
    # What the fix is for: the same sum taken in the model's dtype is off by far more.
    naive = model.prior.log_prob(z).flatten(1).sum(dim=1).double() + logdet.double()
    assert ((naive - exact).abs() / exact.abs()).max() > 10 * rel


def test_log_prob_sum_keeps_float64():
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    total = LaplacePrior().log_prob_sum(z, 0.8)
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, LaplacePrior().log_prob(z, 0.8).flatten(1).sum(dim=1), rtol=1e-15, atol=0)


def test_inpainting_discards_non_finite_restarts(monkeypatch):
    """A restart whose draw is NaN is never chosen, in the screening or at the end."""
    model = tiny_model(8, 1, 4, n_layers=1)
    x = random_images(model, batch=2)
    known = torch.ones(8, 8, dtype=torch.bool)
    known[2:5, 3:6] = False
    draws_of = model.sample_latents

    def poisoned(n, *args, **kwargs):
        z = draws_of(n, *args, **kwargs)
        z[0::2] = float("nan")  # restart 0 of every image
        return z

    monkeypatch.setattr(model, "sample_latents", poisoned)
    for init_draws in (2, 4):  # without and with screening
        result = inpaint(model, x, known, steps=2, restarts=2, init_draws=init_draws,
                         generator=torch.Generator().manual_seed(0), return_info=True)
        assert bool(torch.isfinite(result.images).all()) and bool(torch.isfinite(result.log_prob).all())
        if init_draws == 2:
            assert result.best_restart.tolist() == [1, 1]


def test_inpainting_with_every_restart_non_finite_says_so(monkeypatch):
    model = tiny_model(8, 1, 4, n_layers=1)
    x = random_images(model, batch=1)
    known = torch.ones(8, 8, dtype=torch.bool)
    known[2:5, 3:6] = False
    monkeypatch.setattr(model, "sample_latents", lambda n, *a, **k: torch.full((n, 1, 8, 8), float("nan"), dtype=torch.float64))
    # An InputError (the CLI prints it as one line) and a FloatingPointError.
    with pytest.raises(inpaint_module.NonFiniteRestartsError, match="every one of the 2 inpainting restarts") as caught:
        inpaint(model, x, known, steps=1, restarts=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(caught.value, FloatingPointError) and isinstance(caught.value, ValueError)


def test_finite_or_worst_orders_nan_last():
    scores = torch.tensor([[float("nan"), -5.0, float("inf")], [1.0, float("-inf"), 2.0]])
    cleaned = inpaint_module._finite_or_worst(scores)
    assert cleaned.argmax(dim=1).tolist() == [1, 2]
    assert cleaned.topk(1, dim=1).indices.flatten().tolist() == [1, 2]
