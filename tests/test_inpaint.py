"""Inpainting over the inference cone (appendix F) against the all-latents baseline."""
import argparse
import json
import math

import pytest
import torch

from rgkern.cli.inpaint import add_cli
from rgkern.locality.inpaint import InpaintProblem, InpaintResult, central_known_mask, inpaint, psnr
from rgkern.tools import checkpoint

from utils import random_images, tiny_model


def images(model, batch=2, seed=1):
    return random_images(model, batch, seed)


def random_model(L=16, k=4, C=2, n_layers=1, dtype=torch.float64, seed=0, variant="paper"):
    return tiny_model(L, C, k, dtype=dtype, seed=seed, n_layers=n_layers, variant=variant)


def known_mask(L, rows, cols):
    known = torch.ones(L, L, dtype=torch.bool)
    known[rows, cols] = False
    return known


def run(model, x, known, incremental, steps=4, restarts=3, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return inpaint(model, x, known, steps=steps, restarts=restarts, generator=g, incremental=incremental,
                   return_info=True, **kwargs)


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_cone_and_all_latents_optimise_the_same_function(variant):
    """Latents outside the cone get zero gradient: with the same draws both paths agree."""
    model = random_model(variant=variant)
    x = images(model)
    known = known_mask(16, slice(5, 9), slice(13, 18))  # wraps? no: cols 13..15
    known[0, 15] = known[15, 0] = False  # and two pixels across the periodic boundary
    cone = run(model, x, known, incremental=True)
    full = run(model, x, known, incremental=False)
    torch.testing.assert_close(cone.loss_history, full.loss_history, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(cone.images, full.images, rtol=1e-8, atol=1e-8)
    assert torch.equal(cone.best_restart, full.best_restart)
    geometry = model.geometry
    unknown = ~known
    assert int(cone.free_latents[0]) == 2 * int(geometry.inference_cone(unknown).sum())
    assert int(full.free_latents[0]) == 2 * 16 * 16
    patches = sum(len(p) for p in geometry.inference_patches(unknown))
    assert int(cone.patch_evals_per_step[0]) == 2 * patches
    assert int(full.patch_evals_per_step[0]) == 2 * sum(s.num_patches for s in geometry.sublayers)


def test_result_keeps_known_pixels_and_reports_true_log_likelihood():
    model = random_model(C=1)
    x = images(model, batch=3)
    known = known_mask(16, slice(4, 10), slice(6, 9))
    x_corrupt = x.clone()
    x_corrupt[:, :, ~known] = float("nan")  # unknown values are never read
    result = run(model, x_corrupt, known, incremental=True, steps=6, restarts=2)
    assert isinstance(result, InpaintResult)
    assert result.images.shape == x.shape
    assert torch.equal(result.images[:, :, known], x[:, :, known])
    assert bool(torch.isfinite(result.images).all())
    torch.testing.assert_close(result.log_prob, model.log_prob(result.images).detach(), rtol=1e-12, atol=1e-9)
    assert result.losses.shape == (3, 2) and result.loss_history.shape == (6, 3, 2)
    best = result.losses.gather(1, result.best_restart[:, None]).squeeze(1)
    torch.testing.assert_close(best, result.losses.min(dim=1).values)
    # Adam lowers the loss of every restart over a few steps.
    assert bool((result.losses < result.loss_history[0]).all())


def test_default_return_is_the_filled_images():
    model = random_model(C=1)
    x = images(model, batch=1)
    known = known_mask(16, 3, slice(2, 5))
    filled = inpaint(model, x, known, steps=2, restarts=1, generator=torch.Generator().manual_seed(0))
    assert isinstance(filled, torch.Tensor) and filled.shape == x.shape
    assert torch.equal(filled[:, :, known], x[:, :, known])
    assert not torch.equal(filled, x)


def test_per_image_masks_equal_separate_runs():
    model = random_model(C=1)
    x = images(model, batch=3)
    masks = torch.stack([known_mask(16, slice(2, 5), slice(2, 5)), known_mask(16, 9, slice(0, 16)),
                         known_mask(16, slice(2, 5), slice(2, 5))])
    together = run(model, x, masks, incremental=True, steps=3, restarts=2)
    for b in range(3):
        assert torch.equal(together.images[b][:, masks[b]], x[b][:, masks[b]])
    # Images 0 and 2 share a mask and form one batch; the same draws alone give the same fill.
    g = torch.Generator().manual_seed(0)
    alone = inpaint(model, x[[0, 2]], masks[0], steps=3, restarts=2, generator=g, return_info=True)
    torch.testing.assert_close(together.images[[0, 2]], alone.images, rtol=1e-10, atol=1e-10)


def test_init_draws_keeps_the_most_likely_draws():
    model = random_model(C=1)
    x = images(model, batch=2)
    known = known_mask(16, slice(6, 9), slice(6, 9))
    result = run(model, x, known, incremental=True, steps=1, restarts=2, init_draws=5)
    problem = InpaintProblem(model, x, ~known, incremental=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = model.sample_latents(2 * 5, generator=g, dtype=torch.float64)
        losses = -problem.log_prob(problem.free_from_latents(draws)).view(2, 5)
    expected = losses.sort(dim=1).values[:, :2]
    torch.testing.assert_close(result.loss_history[0].sort(dim=1).values, expected, rtol=1e-12, atol=1e-9)


def test_inpaint_checks_its_input():
    model = random_model(C=1)
    x = images(model, batch=2)
    known = known_mask(16, 3, 3)
    with pytest.raises(TypeError, match="bool"):
        inpaint(model, x, known.float(), steps=1, restarts=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        inpaint(model, x, known.tolist(), steps=1, restarts=1)
    with pytest.raises(ValueError, match=r"\(16, 16\) or \(B, 16, 16\) = \(2, 16, 16\), got \(3, 16, 16\)"):
        inpaint(model, x, known.expand(3, 16, 16), steps=1, restarts=1)
    with pytest.raises(ValueError, match="every pixel as known"):
        inpaint(model, x, torch.ones(16, 16, dtype=torch.bool), steps=1, restarts=1)
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        inpaint(model, x, torch.stack([known, torch.ones(16, 16, dtype=torch.bool)]), steps=1, restarts=1)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="known pixels"):
        inpaint(model, bad, known, steps=1, restarts=1)
    with pytest.raises(ValueError, match="restarts"):
        inpaint(model, x, known, steps=1, restarts=0)
    with pytest.raises(ValueError, match="steps"):
        inpaint(model, x, known, steps=-1)
    with pytest.raises(ValueError, match="init_draws"):
        inpaint(model, x, known, steps=1, restarts=3, init_draws=2)
    with pytest.raises(ValueError, match="lr"):
        inpaint(model, x, known, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="channels"):
        inpaint(model, torch.zeros(1, 3, 16, 16, dtype=torch.float64), known)


def test_psnr_and_central_mask():
    known = central_known_mask(32, 10)
    assert int((~known).sum()) == 100 and not known[11, 11] and known[10, 10] and not known[20, 20]
    a = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    b = a.clone()
    b[:, :, ~known] = 10
    assert abs(float(psnr(b, a, ~known)[0]) - 10 * math.log10(255.0**2 / 100)) < 1e-9
    assert float(psnr(a, a, ~known)[0]) == 100.0
    with pytest.raises(ValueError, match="region size"):
        central_known_mask(32, 40)


def test_cli_writes_grid_and_psnr(tmp_path, capsys):
    from PIL import Image

    model = random_model(L=32, C=3, dtype=torch.float32)
    path = checkpoint.save_checkpoint(tmp_path / "model.safetensors", model)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args([
        "inpaint", "--checkpoint", str(path), "--data", "msds1", "--num", "2", "--steps", "2",
        "--restarts", "2", "--out", str(out), "--device", "cpu", "--backend", "torch", "--no-progress",
    ])
    assert args.func(args) == 0
    grid = Image.open(out / "inpaint.png")
    assert grid.size[0] > grid.size[1]  # 4 columns, 2 rows
    summary = json.loads((out / "inpaint.json").read_text())
    assert set(summary["methods"]) == {"cone", "all_latents"}
    cone, full = summary["methods"]["cone"], summary["methods"]["all_latents"]
    assert len(cone["psnr"]) == 2 and cone["free_latents"] == 1344
    assert cone["patch_evals_per_step"] == 120 and full["patch_evals_per_step"] == 340
    assert abs(cone["mean_psnr"] - full["mean_psnr"]) < 0.5  # same draws, same objective
    assert "PSNR" in capsys.readouterr().out
