"""Tests for rgkern.tools.quality: the MSDS quality score (blobs, their sizes, colour and orientation spread)."""
import math

import numpy as np
import pytest
import torch

from rgkern.core.errors import InputError, InputTypeError
from rgkern.data import generate_msds
from rgkern.tools.quality import BRIGHT_THRESHOLD, format_quality, label_blobs, msds_quality


@pytest.fixture(scope="module")
def msds1():
    return generate_msds(1, 256, split="test")[0]


@pytest.fixture(scope="module")
def msds2():
    return generate_msds(2, 256, split="test")[0]


def blank(n=1):
    return np.zeros((n, 3, 32, 32), dtype=np.uint8)


def paint(image, rows, cols, colour):
    """Fill the rectangle ``image[:, rows, cols]`` (slices) with an RGB colour, in place."""
    image[:, rows, cols] = np.asarray(colour, dtype=np.uint8)[:, None, None]


# ----------------------------------------------------------------------------- the data
def test_msds1_data_scores_like_the_issue_figures(msds1):
    score = msds_quality(msds1, kind=1)
    # The issue measured 89% oval-sized blobs, 14.3 blobs per image, colour spread 28.
    assert score["images"] == 256
    assert set(score) == {"images", "blobs", "blobs_per_image", "specks_per_image", "oval_fraction", "colour_spread"}
    assert score["specks_per_image"] == 0  # no lone bright pixels in MSDS1
    assert 0.85 < score["oval_fraction"] < 0.93
    assert 13.5 < score["blobs_per_image"] < 15.0
    assert 25 < score["colour_spread"] < 32
    assert score["blobs"] == round(score["blobs_per_image"] * 256)


def test_the_global_factor_of_each_kind_has_the_small_spread(msds1, msds2):
    one, two = msds_quality(msds1, kind=2), msds_quality(msds2, kind=2)
    assert 0.85 < two["oval_fraction"] < 0.93 and 13.5 < two["blobs_per_image"] < 15.0
    # MSDS1: one colour per image, orientations uniform; MSDS2 the other way round.
    assert one["colour_spread"] < 32 < 80 < two["colour_spread"]
    # MSDS2 angles lie within 45 degrees (std 13); uniform angles give about 35.
    assert two["orientation_spread"] < 16 < 30 < one["orientation_spread"]


def test_torch_and_numpy_inputs_give_the_same_score(msds1):
    assert msds_quality(torch.from_numpy(msds1[:32]), kind=2) == msds_quality(msds1[:32], kind=2)


# ----------------------------------------------------------------------------- known blobs
def test_known_blobs_exact_counts_sizes_and_colours():
    images = blank(3)
    # Image 0: a 3x4 block (12 px, oval-sized), a 2x2 block (4 px) and a 5x6 block (30 px).
    paint(images[0], slice(1, 4), slice(1, 5), (200, 10, 10))
    paint(images[0], slice(10, 12), slice(10, 12), (50, 60, 70))
    paint(images[0], slice(20, 25), slice(20, 26), (0, 0, 255))
    # Image 1: two oval-sized blobs of 10 px that touch only at a corner (4-connectivity keeps
    # them apart), and a pixel just below the threshold next to one of them.
    paint(images[1], slice(0, 2), slice(0, 5), (100, 100, 100))
    paint(images[1], slice(2, 4), slice(5, 10), (160, 120, 40))
    images[1, :, 0, 5] = BRIGHT_THRESHOLD - 1
    # Image 2: nothing bright, but not zero either; then three lone bright pixels (specks),
    # one bright in green only, and a 2-pixel blob, the smallest there is.
    images[2] = BRIGHT_THRESHOLD - 1
    images[2, :, 5, 5] = images[2, 1, 9, 20] = images[2, :, 30, 0] = 255
    images[2, :, 20, 3:5] = BRIGHT_THRESHOLD
    labels = label_blobs(images.max(axis=1) >= BRIGHT_THRESHOLD)
    sizes = [sorted(np.unique(labels[i][labels[i] >= 0], return_counts=True)[1].tolist()) for i in range(3)]
    assert sizes == [[4, 12, 30], [10, 10], [1, 1, 1, 2]]
    score = msds_quality(images, kind=1)
    assert score["blobs"] == 6 and score["blobs_per_image"] == pytest.approx(6 / 3, rel=1e-12)
    assert score["specks_per_image"] == pytest.approx(3 / 3, rel=1e-12)
    assert score["oval_fraction"] == pytest.approx(3 / 6, rel=1e-12)
    # Only image 1 holds two oval-sized blobs: RMS distance of (100,100,100) and (160,120,40)
    # from their mean is half the distance between them.
    expected = 0.5 * math.dist((100, 100, 100), (160, 120, 40))
    assert score["colour_spread"] == pytest.approx(expected, rel=1e-12)


def test_a_blob_of_mixed_colours_has_its_mean_colour():
    images = blank()
    paint(images[0], slice(2, 4), slice(2, 7), (90, 0, 30))      # 10 px
    paint(images[0], slice(2, 4), slice(7, 9), (250, 40, 0))     # 4 px joined to it: one blob of 14
    paint(images[0], slice(20, 22), slice(20, 26), (90, 10, 20))  # 12 px
    first = (np.array([90, 0, 30]) * 10 + np.array([250, 40, 0]) * 4) / 14
    colours = np.stack([first, np.array([90, 10, 20])])
    expected = math.sqrt(((colours - colours.mean(axis=0)) ** 2).sum(axis=1).mean())
    score = msds_quality(images, kind=1)
    assert score["blobs"] == 2 and score["oval_fraction"] == 1.0
    assert score["colour_spread"] == pytest.approx(expected, rel=1e-12)


def test_oval_size_bounds_are_inclusive():
    images = blank()
    for row, width in ((0, 7), (4, 8), (8, 24), (12, 25)):  # one-row bars of 7, 8, 24 and 25 px
        paint(images[0], slice(row, row + 1), slice(0, width), (255, 255, 255))
    assert msds_quality(images)["oval_fraction"] == pytest.approx(2 / 4, rel=1e-12)


def test_orientation_spread_of_known_bars():
    def bars(angles):
        image = blank()
        for k, angle in enumerate(angles):
            top, left = 8 * (k // 4), 8 * (k % 4)
            if angle == 0:      # a horizontal bar of 7 x 2 pixels
                paint(image[0], slice(top + 3, top + 5), slice(left, left + 7), (200, 200, 200))
            elif angle == 90:   # a vertical one
                paint(image[0], slice(top, top + 7), slice(left + 3, left + 5), (200, 200, 200))
            else:               # a diagonal one, one pixel per row and column
                steps = np.arange(7)
                cols = left + (steps if angle == 45 else 6 - steps)
                image[0][:, top + steps, cols] = 200
                image[0][:, top + steps[:-1], cols[:-1] + (1 if angle == 45 else -1)] = 200  # 4-connected
        return image

    assert msds_quality(bars([0, 0, 0]), kind=2)["orientation_spread"] == pytest.approx(0, abs=1e-9)
    assert msds_quality(bars([45, 45]), kind=2)["orientation_spread"] == pytest.approx(0, abs=1e-9)
    # 0 and 90 degrees are opposite in doubled angles: R = 0, spread sqrt(2) / 2 radians.
    assert msds_quality(bars([0, 90]), kind=2)["orientation_spread"] == pytest.approx(math.degrees(math.sqrt(2) / 2), rel=1e-9)
    # 45 and 135 too (one bar rising, the other falling).
    assert msds_quality(bars([45, 135]), kind=2)["orientation_spread"] == pytest.approx(math.degrees(math.sqrt(2) / 2), rel=1e-9)
    # Two horizontal, one vertical: R = 1/3.
    third = math.degrees(math.sqrt(2 * (1 - 1 / 3)) / 2)
    assert msds_quality(bars([0, 0, 90]), kind=2)["orientation_spread"] == pytest.approx(third, rel=1e-9)
    assert "orientation_spread" not in msds_quality(bars([0, 90]), kind=1)


def test_no_blobs_or_single_blobs_leave_the_figures_undefined():
    score = msds_quality(blank(4), kind=2)
    assert score["blobs"] == 0 and score["blobs_per_image"] == 0
    assert score["oval_fraction"] is None and score["colour_spread"] is None and score["orientation_spread"] is None
    one = blank(2)
    paint(one[0], slice(0, 3), slice(0, 4), (255, 0, 0))
    score = msds_quality(one, kind=1)
    assert score["oval_fraction"] == 1.0 and score["colour_spread"] is None
    assert "n/a" in format_quality(score) and "100.0% oval-sized blobs" in format_quality(score)


def test_labels_match_scipy_on_random_masks():
    ndimage = pytest.importorskip("scipy.ndimage")
    generator = np.random.default_rng(3)
    for density in (0.2, 0.5, 0.6, 0.9):
        bright = generator.random((16, 32, 32)) < density
        labels = label_blobs(bright)
        for image in range(16):
            reference, count = ndimage.label(bright[image])  # 4-connectivity by default
            assert np.array_equal(labels[image] >= 0, reference > 0)
            pairs = set(zip(labels[image][reference > 0].tolist(), reference[reference > 0].tolist()))
            assert len(pairs) == count == len(np.unique(labels[image][labels[image] >= 0]))


def test_labels_follow_a_long_winding_blob():
    bright = np.zeros((1, 32, 32), dtype=bool)
    bright[0, ::2, :] = True  # rows joined at alternate ends: one path of 528 pixels
    bright[0, 1::4, 31] = True
    bright[0, 3::4, 0] = True
    labels = label_blobs(bright)
    assert np.unique(labels[0][bright[0]]).tolist() == [0]


# ----------------------------------------------------------------------------- noise
def test_noise_has_few_oval_sized_blobs(msds1):
    generator = np.random.default_rng(0)
    uniform = generator.integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8)
    assert msds_quality(uniform)["oval_fraction"] < 0.05
    # Sparse coloured specks on black (a crude stand-in for an untrained model's samples).
    specks = np.where(generator.random((64, 1, 32, 32)) < 0.3, uniform, 0).astype(np.uint8)
    data, noise = msds_quality(msds1), msds_quality(specks)
    assert noise["oval_fraction"] < 0.2 < 0.85 < data["oval_fraction"]
    assert noise["blobs_per_image"] > 2 * data["blobs_per_image"]
    assert noise["specks_per_image"] > 50 and data["specks_per_image"] == 0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "images, error, words",
    [
        (np.zeros((2, 3, 32, 32), dtype=np.float32), InputTypeError, "uint8"),
        (torch.zeros(2, 3, 32, 32), InputTypeError, "uint8"),
        ([[0]], InputTypeError, "list"),
        (np.zeros((2, 1, 32, 32), dtype=np.uint8), InputError, "(2, 1, 32, 32)"),
        (np.zeros((3, 32, 32), dtype=np.uint8), InputError, "(3, 32, 32)"),
        (np.zeros((2, 3, 16, 16), dtype=np.uint8), InputError, "(N, 3, 32, 32)"),
        (np.zeros((0, 3, 32, 32), dtype=np.uint8), InputError, "N >= 1"),
    ],
)
def test_bad_images_are_refused(images, error, words):
    with pytest.raises(error) as caught:
        msds_quality(images)
    assert words in str(caught.value)


@pytest.mark.parametrize("kind", [0, 3, "1", True, 1.5])
def test_bad_kind_is_refused(kind):
    with pytest.raises(InputError, match="kind must be 1"):
        msds_quality(blank(), kind=kind)
