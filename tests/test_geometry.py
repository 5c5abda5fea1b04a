"""Geometry tables against a direct loop over docs/design.md section 1's formulas."""
import pytest
import torch

from rgkern.core.geometry import DECIMATOR, DISENTANGLER, get_geometry

SIZES = [(4, 2), (8, 2), (8, 4), (16, 4), (32, 4), (16, 8), (64, 4)]


def v2(n: int, cap: int) -> int:
    if n == 0:
        return cap
    count = 0
    while n % 2 == 0:
        n //= 2
        count += 1
    return min(count, cap)


@pytest.mark.parametrize("L,k", SIZES)
def test_patch_tables_match_direct_loop(L, k):
    geometry = get_geometry(L, k, 3)
    H = geometry.num_levels
    assert 2 ** (H - 1) * k == L
    assert len(geometry.sublayers) == 2 * H
    for s, sub in enumerate(geometry.sublayers):
        h = s // 2
        kind = DISENTANGLER if s % 2 == 0 else DECIMATOR
        offset = k * 2**h // 2 if kind == DISENTANGLER else 0
        assert (sub.level, sub.kind, sub.offset, sub.dilation, sub.stride) == (h, kind, offset, 2**h, k * 2**h)
        n = L // (k * 2**h)
        assert sub.num_patches == n * n
        expected = []
        for p in range(n):
            for q in range(n):
                patch = []
                for a in range(k):
                    for b in range(k):
                        i = (p * k * 2**h + a * 2**h + offset) % L
                        j = (q * k * 2**h + b * 2**h + offset) % L
                        patch.append(i * L + j)
                expected.append(patch)
        assert torch.equal(sub.pixel_index, torch.tensor(expected))


@pytest.mark.parametrize("L,k", SIZES)
def test_each_sublayer_covers_its_grid_exactly_once(L, k):
    geometry = get_geometry(L, k, 1)
    coords = torch.arange(L)
    for sub in geometry.sublayers:
        counts = torch.bincount(sub.pixel_index.flatten(), minlength=L * L).view(L, L)
        on_grid = (coords[:, None] % sub.dilation == 0) & (coords[None, :] % sub.dilation == 0)
        assert torch.all(counts[on_grid] == 1), sub.name
        assert torch.all(counts[~on_grid] == 0), sub.name


@pytest.mark.parametrize("L,k", SIZES)
@pytest.mark.parametrize("C", [1, 3])
def test_levels_and_latent_counts(L, k, C):
    geometry = get_geometry(L, k, C)
    H = geometry.num_levels
    expected = torch.tensor([[min(v2(i, H - 1), v2(j, H - 1)) for j in range(L)] for i in range(L)])
    assert torch.equal(geometry.levels, expected)
    counts = [C * (L // 2**h) ** 2 * 3 // 4 for h in range(H - 1)] + [C * k * k]
    assert geometry.latent_counts == counts
    assert sum(counts) == C * L * L


def test_row_index_orders_channel_then_patch_pixel():
    L, k, C = 8, 4, 3
    geometry = get_geometry(L, k, C)
    pix = geometry.pixel_index(1)
    rows = geometry.row_index(1)
    assert rows.shape == (4, C * k * k)
    for c in range(C):
        assert torch.equal(rows[:, c * k * k : (c + 1) * k * k], pix + c * L * L)


def test_checkerboard_mask_is_shared_by_channels_and_flips():
    geometry = get_geometry(8, 4, 3)
    mask = geometry.coupling_mask(dtype=torch.float64)
    patch = mask.view(3, 4, 4)
    assert torch.equal(patch[0], patch[2])
    assert patch[0, 0, 0] == 1 and patch[0, 0, 1] == 0 and patch[0, 1, 0] == 0 and patch[0, 1, 1] == 1
    assert torch.equal(geometry.coupling_mask(dtype=torch.float64, flipped=True), 1 - mask)


def test_geometry_is_shared_and_device_tables_cached():
    assert get_geometry(16, 4, 3) is get_geometry(16, 4, 3)
    geometry = get_geometry(16, 4, 3)
    assert geometry.row_index(0) is geometry.row_index(0)


@pytest.mark.parametrize("L,k", [(12, 4), (24, 4), (10, 2), (33, 4), (2, 4)])
def test_bad_image_size_names_value(L, k):
    with pytest.raises(ValueError, match=str(L)):
        get_geometry(L, k, 3)


def test_odd_kernel_size_rejected():
    with pytest.raises(ValueError, match="kernel_size"):
        get_geometry(24, 3, 3)
