"""Tests for rgkern.data: MSDS generators, CIFAR-10 pickles, image folders, factory."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rgkern.data import CIFAR10, MSDS, DataNotFoundError, ImageFolder, generate_msds, load_dataset, msds

N_STRUCT = 200          # images per kind for the pixel-structure checks


# --------------------------------------------------------------------------- #
# Pixel measurements (independent of the generator's code)
# --------------------------------------------------------------------------- #

def _cells(images):
    """(N, 3, 32, 32) -> float (N, 16, 3, 8, 8); cell k = 4 * row + col."""
    n = images.shape[0]
    x = images.reshape(n, 3, 4, 8, 4, 8).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, 16, 3, 8, 8).astype(np.float64)


def _cell_colours(images):
    """Mean colour of the bright (oval) pixels of each cell -> (N, 16, 3)."""
    c = _cells(images)
    bright = c.max(axis=2)
    mask = bright >= 0.8 * bright.max(axis=(2, 3), keepdims=True)
    return (c * mask[:, :, None]).sum(axis=(3, 4)) / mask.sum(axis=(2, 3))[:, :, None]


def _cell_orientations(images):
    """Orientation (degrees, mod 180, counter-clockwise with y up) of each cell's
    blob from the second moments of its normalised brightness -> (N, 16)."""
    c = _cells(images)
    w = c.max(axis=2)
    w = w / np.maximum(w.max(axis=(2, 3), keepdims=True), 1.0)
    yy, xx = np.mgrid[0:8, 0:8].astype(np.float64)
    m = w.sum(axis=(2, 3))
    cx = (w * xx).sum(axis=(2, 3)) / m
    cy = (w * yy).sum(axis=(2, 3)) / m
    dx = xx - cx[..., None, None]
    dy = -(yy - cy[..., None, None])            # image rows point down; make y point up
    mxx = (w * dx * dx).sum(axis=(2, 3))
    myy = (w * dy * dy).sum(axis=(2, 3))
    mxy = (w * dx * dy).sum(axis=(2, 3))
    return 0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy))


def _orientation_concentration(angles_deg):
    """Within-image circular concentration of orientations mod 180 (doubled
    angles): 1 = all parallel, ~0.22 for 16 independent uniform angles."""
    return np.abs(np.exp(2j * np.radians(angles_deg)).mean(axis=1))


@pytest.fixture(scope="module")
def msds1():
    return generate_msds(1, N_STRUCT, seed=0)


@pytest.fixture(scope="module")
def msds2():
    return generate_msds(2, N_STRUCT, seed=0)


# --------------------------------------------------------------------------- #
# MSDS: determinism
# --------------------------------------------------------------------------- #

def test_msds_deterministic_by_seed():
    a, la = generate_msds(1, 20, seed=3)
    b, lb = generate_msds(1, 20, seed=3)
    c, _ = generate_msds(1, 20, seed=4)
    assert a.tobytes() == b.tobytes()
    for key in la:
        np.testing.assert_array_equal(la[key], lb[key])
    assert not np.array_equal(a, c)


def test_msds_prefix_and_subset_property():
    small = MSDS(kind=2, split="train", size=50, seed=1, progress=False)
    big = MSDS(kind=2, split="train", size=100, seed=1, progress=False)
    assert torch.equal(small.images, big.images[:50])
    for key in small.labels:
        np.testing.assert_array_equal(small.labels[key], big.labels[key][:50])
    picked, labels = generate_msds(2, [70, 3, 99], seed=1)
    np.testing.assert_array_equal(picked, big.images[[70, 3, 99]].numpy())
    np.testing.assert_array_equal(labels["angle"], big.labels["angle"][[70, 3, 99]])


def test_msds_splits_and_kinds_differ():
    train, _ = generate_msds(1, 10, split="train")
    test, _ = generate_msds(1, 10, split="test")
    other, _ = generate_msds(2, 10, split="train")
    assert not np.array_equal(train, test)
    assert not np.array_equal(train, other)


# --------------------------------------------------------------------------- #
# MSDS: image format
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("kind", [1, 2])
def test_msds_dataset_format(kind):
    ds = MSDS(kind=kind, split="test", size=8, progress=False)
    assert len(ds) == 8
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (8, 3, 32, 32)
    item = ds[0]
    assert item.dtype == torch.uint8 and item.shape == (3, 32, 32)
    assert item.any()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32)
    labels = ds.labels
    assert labels["position"].shape == (8, 16, 2)
    assert labels["angle"].shape == (8, 16)
    assert labels["colour"].shape == (8, 16, 3) and labels["colour"].dtype == np.uint8


@pytest.mark.parametrize("which", ["msds1", "msds2"])
def test_msds_black_background_and_antialiasing(which, request):
    images, _ = request.getfixturevalue(which)
    assert images.dtype == np.uint8 and images.shape == (N_STRUCT, 3, 32, 32)
    c = _cells(images)
    corners = c[:, :, :, [0, 0, 7, 7], [0, 7, 0, 7]].max(axis=2)
    assert (corners == 0).mean() > 0.85            # measured ~0.94
    bright = c.max(axis=2)
    nonzero = bright > 0
    assert 0.2 < nonzero.mean() < 0.7              # ovals cover ~40 % of the pixels
    # Anti-aliased edges: many lit pixels are well below their oval's peak.
    dim = nonzero & (bright < 0.5 * bright.max(axis=(2, 3), keepdims=True))
    assert dim.sum() / nonzero.sum() > 0.1        # measured ~0.4
    # Every cell holds a visible oval (up to the rare near-black MSDS2 colour).
    assert (bright.max(axis=(2, 3)) > 0).mean() > 0.99


# --------------------------------------------------------------------------- #
# MSDS: structure measured from pixels
# --------------------------------------------------------------------------- #

def test_msds_colour_is_global_in_msds1_local_in_msds2(msds1, msds2):
    spread1 = _cell_colours(msds1[0]).std(axis=1).mean(axis=-1)   # (N,)
    spread2 = _cell_colours(msds2[0]).std(axis=1).mean(axis=-1)
    # Measured: MSDS1 ~19 (offsets uniform in [-32, 32] have std 18.8),
    # MSDS2 ~73 (uniform in [0, 255] has std 73.9).
    assert spread1.mean() < 25
    assert spread2.mean() > 50
    assert np.median(spread2) > np.percentile(spread1, 99) + 20


def test_msds_orientation_is_global_in_msds2_local_in_msds1(msds1, msds2):
    r1 = _orientation_concentration(_cell_orientations(msds1[0]))
    r2 = _orientation_concentration(_cell_orientations(msds2[0]))
    # Measured: MSDS1 ~0.23 (16 independent angles), MSDS2 ~0.90 (a 45 degree fan).
    assert r1.mean() < 0.4
    assert r2.mean() > 0.75
    assert np.median(r2) > np.percentile(r1, 90) + 0.2


@pytest.mark.parametrize("which", ["msds1", "msds2"])
def test_msds_labels_agree_with_pixels(which, request):
    images, labels = request.getfixturevalue(which)
    # Orientation from pixels matches the label angle (mod 180).
    est = _cell_orientations(images)
    agreement = np.cos(2 * np.radians(est - labels["angle"]))
    assert agreement.mean() > 0.9 and (agreement > 0.9).mean() > 0.9   # measured 0.98 / 0.96
    # Colour from pixels matches the label colour.
    err = np.abs(_cell_colours(images) - labels["colour"])
    assert err.mean() < 15 and np.median(err) < 12                     # measured ~8.6 / ~8
    # Positions: tile corners on the 4x4 grid, jittered by at most one pixel.
    pos = labels["position"].astype(int)
    grid = np.stack([np.tile(np.arange(4) * 8, 4), np.repeat(np.arange(4) * 8, 4)], axis=1)
    jitter = pos - grid
    assert set(np.unique(jitter)) == {-1, 0, 1}
    # The brightness centroid of each cell follows the tile position.
    c = _cells(images).max(axis=2)
    xs = (c * np.arange(8)[None, None, None, :]).sum(axis=(2, 3)) / c.sum(axis=(2, 3))
    corr = np.corrcoef(xs.ravel(), jitter[..., 0].ravel())[0, 1]
    assert corr > 0.6


def test_msds_label_ranges(msds1, msds2):
    _, l1 = msds1
    _, l2 = msds2
    base = l1["base_colour"].astype(int)
    assert base.min() >= 32 and base.max() <= 223
    off = l1["colour"].astype(int) - base[:, None, :]
    assert off.min() >= -32 and off.max() <= 32 and off.min() < -25 and off.max() > 25
    assert l1["angle"].min() >= 0 and l1["angle"].max() < 180
    off2 = l2["angle"] - l2["base_angle"][:, None]
    assert off2.min() >= 0 and off2.max() < 45
    assert l2["base_angle"].min() >= 0 and l2["base_angle"].max() < 180
    assert l2["colour"].min() < 10 and l2["colour"].max() > 245


def test_msds_cache(tmp_path, monkeypatch):
    first = MSDS(kind=1, split="test", size=5, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(msds, "generate_msds", fail)
    second = MSDS(kind=1, split="test", size=5, progress=False, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images)
    for key in first.labels:
        np.testing.assert_array_equal(first.labels[key], second.labels[key])


# --------------------------------------------------------------------------- #
# MSDS: argument errors
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("kwargs, fragment", [
    (dict(kind=3), "3"),
    (dict(kind="1"), "'1'"),
    (dict(split="val"), "'val'"),
    (dict(size=0), "0"),
    (dict(size=-5), "-5"),
    (dict(size=10_001, split="test"), "10001"),
    (dict(size=2.5), "2.5"),
    (dict(seed=-1), "-1"),
])
def test_msds_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        MSDS(progress=False, **kwargs)
    assert fragment in str(info.value)


def test_generate_msds_bad_indices():
    with pytest.raises(ValueError, match="10000"):
        generate_msds(1, [0, 10_000], split="test")
    with pytest.raises(ValueError, match="must be"):
        generate_msds(1, 90_001)
    with pytest.raises(ValueError, match="kind"):
        generate_msds(0, 1)
    images, labels = generate_msds(2, 0)
    assert images.shape == (0, 3, 32, 32) and labels["angle"].shape == (0, 16)


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #

def _write_fake_cifar(folder, n_per_batch=4, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arr = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": arr,
                         b"filenames": [b"x.png"] * n_per_batch}, f, protocol=protocol)
        batches[name] = (arr, labels)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_batches(tmp_path, protocol):
    batches = _write_fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = CIFAR10(tmp_path / "cifar-10-batches-py", split="train")
    assert len(train) == 20 and train.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train[0].shape == (3, 32, 32)
    arr, labels = batches["data_batch_2"]
    i, c, y, x = 1, 2, 5, 17                     # image 1 of batch 2 = image 5 overall
    assert train.images[4 + i, c, y, x].item() == arr[i, c * 1024 + y * 32 + x]
    assert torch.equal(train.images[4 + i].reshape(-1), torch.from_numpy(arr[i]))
    assert train.labels[4 + i] == labels[i]
    test = CIFAR10(tmp_path, split="test")       # parent-folder form
    assert len(test) == 4
    np.testing.assert_array_equal(test.images.numpy().reshape(4, -1), batches["test_batch"][0])


def test_cifar10_reads_python2_era_pickle(tmp_path):
    """The real batches were pickled by Python 2 with numpy.core.multiarray globals."""
    batches = _write_fake_cifar(tmp_path)
    arr, labels = batches["test_batch"]
    raw = pickle.dumps({b"data": arr, b"labels": labels}, protocol=2)
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != raw
    (tmp_path / "test_batch").write_bytes(legacy)
    test = CIFAR10(tmp_path, split="test")
    np.testing.assert_array_equal(test.images.numpy().reshape(4, -1), arr)
    np.testing.assert_array_equal(test.labels, labels)


def test_cifar10_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    for exc_type in (FileNotFoundError, ValueError, DataNotFoundError):
        with pytest.raises(exc_type) as info:
            CIFAR10(missing)
        assert str(missing) in str(info.value)


def test_cifar10_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10(tmp_path)
    assert "data_batch_3" in str(info.value) and str(folder) in str(info.value)
    assert len(CIFAR10(tmp_path, split="test")) == 4


def test_cifar10_corrupt_pickle(tmp_path):
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_4").write_bytes(b"\x80\x02garbage" + bytes(range(50)))
    with pytest.raises(ValueError, match="data_batch_4"):
        CIFAR10(tmp_path)


def test_cifar10_refuses_unsafe_pickle(tmp_path):
    _write_fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(ValueError, match="test_batch"):
        CIFAR10(tmp_path, split="test")


def test_data_not_found_error_is_both():
    err = DataNotFoundError("missing /x/y", "/x/y")
    assert isinstance(err, FileNotFoundError) and isinstance(err, ValueError)
    assert str(err) == "missing /x/y" and err.path == "/x/y"
    with pytest.raises(FileNotFoundError):
        raise err
    with pytest.raises(ValueError):
        raise DataNotFoundError("again")


# --------------------------------------------------------------------------- #
# Image folder
# --------------------------------------------------------------------------- #

def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {}
    for rel in ["b.png", "a.png", "sub/c.PNG", "sub/d.jpg.png"]:
        arr = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        _write_png(tmp_path / rel, arr)
        arrays[rel] = arr
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path, arrays


def test_image_folder_rgb(image_dir):
    root, arrays = image_dir
    ds = ImageFolder(root)
    order = ["a.png", "b.png", "sub/c.PNG", "sub/d.jpg.png"]
    assert [p.relative_to(root).as_posix() for p in ds.files] == order
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (4, 3, 8, 8)
    for i, rel in enumerate(order):
        np.testing.assert_array_equal(ds[i].numpy(), arrays[rel].transpose(2, 0, 1))


def test_a_fifo_in_an_image_folder_is_refused_not_waited_on(image_dir):
    """A FIFO named like an image blocked the loader forever; run in a child with a time limit
    so that the old behaviour fails the test instead of hanging the suite."""
    root, _ = image_dir
    os.mkfifo(root / "sub" / "pipe.png")
    script = "import sys\nfrom rgkern.data import ImageFolder\ntry:\n    ImageFolder(sys.argv[1])\n" \
             "except ValueError as error:\n    print(error)\n"
    result = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=120)
    assert "pipe.png is not a regular file" in result.stdout, result.stdout + result.stderr


def test_image_folder_grey(image_dir):
    root, arrays = image_dir
    ds = ImageFolder(root, channels=1)
    assert ds.images.shape == (4, 1, 8, 8)
    expected = np.asarray(Image.fromarray(arrays["a.png"]).convert("L"))
    np.testing.assert_array_equal(ds[0][0].numpy(), expected)


def test_image_folder_crop_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)    # height 8, width 12
    tall = rng.integers(0, 256, size=(20, 10, 3), dtype=np.uint8)
    _write_png(tmp_path / "1.png", wide)
    _write_png(tmp_path / "2.png", tall)
    cropped = ImageFolder(tmp_path, image_size=8)
    assert cropped.images.shape == (2, 3, 8, 8)
    # 12x8 -> centre crop (columns 2..9) at the target size: no resampling.
    np.testing.assert_array_equal(cropped[0].numpy(), wide[:, 2:10].transpose(2, 0, 1))
    resized = ImageFolder(tmp_path, image_size=4, channels=1)
    assert resized.images.shape == (2, 1, 4, 4)
    expected = np.asarray(Image.fromarray(tall[5:15]).convert("L").resize(
        (4, 4), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(resized[1][0].numpy(), expected)


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(missing)
    with pytest.raises(ValueError, match="missing"):
        ImageFolder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"(?s)empty.*\.png") as info:
        ImageFolder(empty)
    assert not isinstance(info.value, FileNotFoundError)
    mixed = tmp_path / "mixed"
    _write_png(mixed / "a.png", np.zeros((8, 8, 3), np.uint8))
    _write_png(mixed / "b.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="b.png"):
        ImageFolder(mixed)
    assert ImageFolder(mixed, image_size=6).images.shape == (2, 3, 6, 6)
    oblong = tmp_path / "oblong"
    _write_png(oblong / "a.png", np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="square"):
        ImageFolder(oblong)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not really a png")
    with pytest.raises(ValueError, match="bad.png"):
        ImageFolder(broken)
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(mixed, channels=2)


# --------------------------------------------------------------------------- #
# load_dataset
# --------------------------------------------------------------------------- #

def test_load_dataset_names(tmp_path):
    ds = load_dataset("MSDS2", split="test", size=3, progress=False)
    assert isinstance(ds, MSDS) and ds.kind == 2 and len(ds) == 3
    _write_fake_cifar(tmp_path / "c" / "cifar-10-batches-py")
    cifar = load_dataset("cifar10", root=tmp_path / "c", split="test", size=2)
    assert isinstance(cifar, CIFAR10) and len(cifar) == 2
    _write_png(tmp_path / "f" / "x.png", np.zeros((8, 8, 3), np.uint8))
    folder = load_dataset("folder", root=tmp_path / "f", image_size=4, progress=False)
    assert isinstance(folder, ImageFolder) and folder.images.shape == (1, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="test"):
        load_dataset("folder", root=tmp_path / "f", split="test")
    _write_png(tmp_path / "f" / "test" / "y.png", np.zeros((8, 8, 3), np.uint8))
    assert len(load_dataset("folder", root=tmp_path / "f", split="test")) == 1
    with pytest.raises(FileNotFoundError, match="'test' sub-folder"):
        load_dataset("folder", root=tmp_path / "f", split="train")   # would mix test images in


def test_load_dataset_errors():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    assert "imagenet" in message and all(
        n in message for n in ("msds1", "msds2", "cifar10", "celeba", "mnist", "folder"))
    for name in ("cifar10", "celeba", "mnist", "folder"):
        with pytest.raises(ValueError, match="root"):
            load_dataset(name)
    with pytest.raises(ValueError, match="'dev'"):
        load_dataset("msds1", split="dev")
    with pytest.raises(ValueError, match="64"):
        load_dataset("msds1", size=2, image_size=64)
    with pytest.raises(ValueError, match="100000"):
        load_dataset("msds2", size=100_000)
