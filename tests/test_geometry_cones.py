"""Inference and generation cones (paper sec. 3.4, 3.5; docs/design.md section 2).

The cones come from dirty-set propagation in rgkern.core.geometry; here they are checked against
brute force (perturb a pixel of a random float64 model and see which latents move, and the
reverse for generation) and against the counts docs/design.md section 2 quotes.
"""
import pytest
import torch

from rgkern.core.geometry import get_geometry

from utils import tiny_model

VARIANTS = ["paper", "authors"]


def random_model(L, k, C, n_layers=2, seed=0, variant="paper"):
    """Tiny float64 model, couplings not the identity; n_layers=2 makes every patch dense.

    (With one RNVP block an updated entry depends on the conditioning half and on itself
    only, so the true dependency could be narrower than the patch.)
    """
    return tiny_model(L, C, k, seed=seed, n_layers=n_layers, variant=variant)


def mask_of(L, pixels):
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i, j in pixels:
        mask[i % L, j % L] = True
    return mask


def brute_force_inference_cone(model, x, pixels):
    with torch.no_grad():
        z = model.encode(x)[0]
        x2 = x.clone()
        for i, j in pixels:
            x2[:, :, i, j] += 0.37
        return (model.encode(x2)[0] != z).any(dim=1).any(dim=0)


def brute_force_generation_cone(model, z, latents):
    with torch.no_grad():
        x = model.decode(z)
        z2 = z.clone()
        for i, j in latents:
            z2[:, :, i, j] += 0.37
        return (model.decode(z2) != x).any(dim=1).any(dim=0)


def sample_points(L):
    return [(0, 0), (L // 2 - 1, L // 2 + 1), (L - 1, 3), (5, L - 2), (L - 1, L - 1)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("L,k,C", [(8, 2, 1), (8, 4, 2), (16, 4, 1)])
def test_cones_match_brute_force(L, k, C, variant):
    model = random_model(L, k, C, variant=variant)
    geometry = model.geometry
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, C, L, L, generator=g, dtype=torch.float64)
    z = model.encode(x)[0].detach()
    for point in sample_points(L):
        mask = mask_of(L, [point])
        assert torch.equal(geometry.inference_cone(mask), brute_force_inference_cone(model, x, [point])), point
        assert torch.equal(geometry.generation_cone(mask), brute_force_generation_cone(model, z, [point])), point


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("L,k", [(8, 2), (16, 4)])
def test_wrapping_region_cones_match_brute_force(L, k, variant):
    """Regions across the periodic boundary: a 2x2 block over the corner and a strip over the edge."""
    model = random_model(L, k, 1, variant=variant)
    geometry = model.geometry
    x = torch.randn(1, 1, L, L, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = model.encode(x)[0].detach()
    corner = [(-1, -1), (-1, 0), (0, -1), (0, 0)]
    strip = [(i, j) for i in (L // 2, L // 2 + 1) for j in (-2, -1, 0, 1)]
    for pixels in (corner, strip):
        pixels = [(i % L, j % L) for i, j in pixels]
        mask = mask_of(L, pixels)
        assert torch.equal(geometry.inference_cone(mask), brute_force_inference_cone(model, x, pixels))
        assert torch.equal(geometry.generation_cone(mask), brute_force_generation_cone(model, z, pixels))


@pytest.mark.parametrize("L,k", [(16, 4), (32, 4), (16, 2)])
def test_wrapping_region_is_union_of_its_pixels_and_reaches_both_sides(L, k):
    geometry = get_geometry(L, k, 1)
    pixels = [(L - 1, L - 1), (L - 1, 0), (0, L - 1), (0, 0), (L // 2, L - 1), (L // 2, 0)]
    union = torch.zeros(L, L, dtype=torch.bool)
    for p in pixels:
        union |= geometry.inference_cone(mask_of(L, [p]))
    cone = geometry.inference_cone(mask_of(L, pixels))
    assert torch.equal(cone, union)
    # The cone of the corner block straddles the boundary: latents on both sides of it.
    corner = geometry.inference_cone(mask_of(L, pixels[:4]))
    assert corner[0, 0] and corner[L - 1, L - 1] and corner[0, L - 1] and corner[L - 1, 0]
    assert corner[1, 1] and corner[L - 2, L - 2]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("L,k", [(8, 2), (16, 4), (16, 2)])
def test_cones_are_transposes_of_each_other(L, k, variant):
    """Pixel u is in the generation cone of latent l iff l is in the inference cone of u."""
    geometry = get_geometry(L, k, 1, variant)
    n = L * L
    inference = torch.stack([geometry.inference_cone(torch.eye(n, dtype=torch.bool)[p].view(L, L)).flatten() for p in range(n)])
    generation = torch.stack([geometry.generation_cone(torch.eye(n, dtype=torch.bool)[p].view(L, L)).flatten() for p in range(n)])
    assert torch.equal(inference, generation.T)


def central_region(L, size=10):
    region = torch.zeros(L, L, dtype=torch.bool)
    start = (L - size) // 2
    region[start : start + size, start : start + size] = True
    return region


@pytest.mark.parametrize("variant, latents", [("paper", 1344), ("authors", 1668)])
def test_central_10x10_region_at_32_reaches_its_latents(variant, latents):
    """1,344 latents with the paper's sublayer order, 1,668 with the authors' (offset 0 first)."""
    model = random_model(32, 4, 3, variant=variant)
    geometry = model.geometry
    cone = geometry.inference_cone(central_region(32))
    assert int(cone.sum()) * geometry.channels == latents
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pixels = central_region(32).nonzero().tolist()
    assert torch.equal(cone, brute_force_inference_cone(model, x, pixels))
    assert 3 * 32 * 32 == 3072
    # Per level: a constant-size share of every level but the top, all of the top level.
    levels = geometry.levels[cone]
    assert int((levels == geometry.num_levels - 1).sum()) == int((geometry.levels == geometry.num_levels - 1).sum())


def test_patch_evaluations_grow_by_a_constant_per_doubling():
    """O(log L) work for a fixed region: 60, 85, 110, 135, 160 patches at L = 32 .. 512."""
    counts, latents, totals = [], [], []
    for L in (32, 64, 128, 256, 512):
        geometry = get_geometry(L, 4, 3)
        region = central_region(L)
        counts.append(sum(len(p) for p in geometry.inference_patches(region)))
        latents.append(int(geometry.inference_cone(region).sum()) * 3)
        totals.append(sum(s.num_patches for s in geometry.sublayers))
    assert counts == [60, 85, 110, 135, 160]
    assert totals[-1] == 43690
    assert len({b - a for a, b in zip(counts, counts[1:])}) == 1
    assert len({b - a for a, b in zip(latents, latents[1:])}) == 1
    assert latents[0] == 1344


def test_generation_patches_of_a_latent_grow_by_a_constant_per_doubling():
    counts = []
    for L in (32, 64, 128):
        geometry = get_geometry(L, 4, 1)
        latents = mask_of(L, [(L // 2 + 1, L // 2 + 3)])  # a level-0 latent near the centre
        counts.append(sum(len(p) for p in geometry.generation_patches(latents)))
    assert counts[2] - counts[1] == counts[1] - counts[0]


def test_cone_masks_are_checked():
    geometry = get_geometry(8, 4, 1)
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(4, 4\)"):
        geometry.inference_cone(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        geometry.generation_cone(torch.zeros(8, 8))
