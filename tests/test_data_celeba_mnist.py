"""Tests for the CelebA and MNIST loaders of rgkern.data, on small files the tests write.

The expected pixels are computed here, independently of the loaders: the JPEG is decoded
with Pillow (that is the data), then cropped and resized with a numpy implementation of the
antialiased bicubic filter (Keys' cubic, a = -0.5, widened by the downscale factor;
horizontal pass, rounding to 8 bits, vertical pass), which agrees with Pillow's fixed-point
arithmetic to one grey level.
"""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from rgkern.data import MNIST, CelebA, DataNotFoundError, load_dataset
from rgkern.data.mnist import read_idx

ALIGNED = (178, 218)          # width, height of the aligned CelebA images


# --------------------------------------------------------------------------- #
# Independent reference of crop + bicubic resize
# --------------------------------------------------------------------------- #

def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resize_matrix(n_in, n_out):
    """(n_out, n_in) weights of the antialiased bicubic resize of one axis."""
    scale = n_in / n_out
    widen = max(scale, 1.0)
    matrix = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - 2 * widen + 0.5), 0)
        hi = min(int(centre + 2 * widen + 0.5), n_in)
        x = np.arange(lo, hi)
        w = _cubic((x + 0.5 - centre) / widen)
        matrix[o, lo:hi] = w / w.sum()
    return matrix


def _to_uint8(x):
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _reference(decoded_hwc, crop=148, size=32, shift=(0, 0)):
    """uint8 (3, size, size): the centre crop (moved by ``shift`` rows, columns) of a decoded (H, W, 3) image, resized bicubically."""
    h, w = decoded_hwc.shape[:2]
    top, left = (h - crop) // 2 + shift[0], (w - crop) // 2 + shift[1]
    x = decoded_hwc[top:top + crop, left:left + crop].astype(np.float64).transpose(2, 0, 1)
    m = _resize_matrix(crop, size)
    rows = _to_uint8(np.einsum("cyx,ox->cyo", x, m)).astype(np.float64)   # horizontal pass
    return _to_uint8(np.einsum("cyx,oy->cox", rows, m))                    # vertical pass


def _face(seed, size=ALIGNED):
    """A random (H, W, 3) image: smooth colour fields plus pixel noise (not flat, so a shifted crop shows)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.uniform(0, 255, size=(h // 8 + 2, w // 8 + 2, 3))
    smooth = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
    return np.clip(smooth + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _write_jpeg(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=90)


def _decoded(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    """root/img_align_celeba with 000001.jpg .. 000006.jpg and root/list_eval_partition.txt."""
    root = tmp_path_factory.mktemp("celeba")
    for i in range(1, 7):
        _write_jpeg(root / "img_align_celeba" / f"{i:06d}.jpg", _face(i))
    # Not the sorted order, so the split must come from the file.
    (root / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 2\n000003.jpg 0\n000004.jpg 1\n000005.jpg 2\n000006.jpg 0\n")
    return root


# --------------------------------------------------------------------------- #
# CelebA
# --------------------------------------------------------------------------- #

def test_bicubic_reference_matches_pillow_to_one_level():
    # The reference itself, on a non-JPEG image: within one grey level of Pillow everywhere.
    image = _face(11, size=(148, 148))
    ours = _reference(image)
    pillow = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(ours.astype(int) - pillow).max() <= 1


def test_celeba_crop_and_resize_match_an_independent_computation(celeba_root):
    ds = CelebA(celeba_root, split="train")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (3, 3, 32, 32)
    assert ds.images.is_contiguous()
    assert [p.name for p in ds.files] == ["000001.jpg", "000003.jpg", "000006.jpg"]
    folder = celeba_root / "img_align_celeba"
    for item, name in zip(ds, ["000001.jpg", "000003.jpg", "000006.jpg"]):
        decoded = _decoded(folder / name)
        expected = _reference(decoded)
        assert np.abs(item.numpy().astype(int) - expected).max() <= 1
        # The crop offsets (15, 35) matter: a crop one pixel off is far from the loader's.
        for shift in ((1, 0), (0, 1), (-1, 0), (0, -1)):
            assert np.abs(item.numpy().astype(int) - _reference(decoded, shift=shift)).max() > 3, shift


def test_celeba_splits_follow_the_partition_file(celeba_root):
    test = load_dataset("celeba", root=celeba_root, split="test", progress=False)
    assert isinstance(test, CelebA) and test.partition_file.name == "list_eval_partition.txt"
    assert [p.name for p in test.files] == ["000002.jpg", "000005.jpg"]
    valid = CelebA(celeba_root, split="valid")
    assert [p.name for p in valid.files] == ["000004.jpg"]
    # root may be the image folder itself; the partition file beside it is still found.
    first = CelebA(celeba_root / "img_align_celeba", split="train", size=1)
    assert len(first) == 1 and first.files[0].name == "000001.jpg"
    train = CelebA(celeba_root, split="train")
    torch.testing.assert_close(first.images[0], train.images[0], rtol=0, atol=0)


def test_celeba_other_sizes_and_the_authors_layout(tmp_path):
    # data_path/celeba/img_align_celeba as in the authors' script; a partition file with a
    # header in CSV form.
    folder = tmp_path / "celeba" / "img_align_celeba"
    _write_jpeg(folder / "a.jpg", _face(3))
    _write_jpeg(folder / "b.jpg", _face(4))
    (tmp_path / "celeba" / "list_eval_partition.csv").write_text("image_id,partition\na.jpg,0\nb.jpg,2\n")
    ds = CelebA(tmp_path, split="test", image_size=64)
    assert ds.images.shape == (1, 3, 64, 64)
    assert np.abs(ds[0].numpy().astype(int) - _reference(_decoded(folder / "b.jpg"), size=64)).max() <= 1
    assert load_dataset("celeba", root=tmp_path, image_size=16, progress=False).images.shape == (1, 3, 16, 16)


def test_celeba_without_a_partition_file_holds_out_the_last_tenth(tmp_path):
    folder = tmp_path / "img_align_celeba"
    for i in range(12):
        _write_jpeg(folder / f"{i:06d}.jpg", _face(20 + i))
    train, test = CelebA(tmp_path, split="train"), CelebA(tmp_path, split="test")
    assert train.partition_file is None
    assert [p.name for p in train.files] == [f"{i:06d}.jpg" for i in range(11)]
    assert [p.name for p in test.files] == ["000011.jpg"]
    with pytest.raises(ValueError, match="'valid' split needs the partition file"):
        CelebA(tmp_path, split="valid")


def test_celeba_greyscale_jpeg_becomes_rgb(tmp_path):
    grey = _face(5)[..., 0]
    path = tmp_path / "img_align_celeba" / "g.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(grey).save(path, quality=90)
    (tmp_path / "list_eval_partition.txt").write_text("g.jpg 0\n")
    item = CelebA(tmp_path)[0].numpy()
    assert item.shape == (3, 32, 32)
    assert np.array_equal(item[0], item[1]) and np.array_equal(item[1], item[2])
    assert item.std() > 5


def test_celeba_corrupt_and_truncated_jpegs_name_the_file(tmp_path):
    folder = tmp_path / "img_align_celeba"
    _write_jpeg(folder / "000001.jpg", _face(1))
    (folder / "000002.jpg").write_bytes(b"this is not a JPEG at all")
    whole = (folder / "000001.jpg").read_bytes()
    (folder / "000003.jpg").write_bytes(whole[: len(whole) // 2])
    partition = tmp_path / "list_eval_partition.txt"
    for name in ("000002.jpg", "000003.jpg"):
        partition.write_text(f"000001.jpg 0\n{name} 0\n")
        with pytest.raises(ValueError, match=rf"cannot read CelebA image .*{name}"):
            CelebA(tmp_path)
    # size keeps the first images, and only those are decoded.
    assert len(CelebA(tmp_path, size=1)) == 1


def test_celeba_bad_inputs(tmp_path):
    with pytest.raises(DataNotFoundError, match="nowhere"):
        CelebA(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="img_align_celeba"):
        CelebA(empty)
    small = tmp_path / "small" / "img_align_celeba"
    _write_jpeg(small / "x.jpg", _face(1, size=(140, 200)))
    (small.parent / "list_eval_partition.txt").write_text("x.jpg 0\n")
    with pytest.raises(ValueError, match=r"x\.jpg is 140x200 .*148x148"):
        CelebA(small.parent)
    ok = tmp_path / "ok" / "img_align_celeba"
    _write_jpeg(ok / "y.jpg", _face(2))
    partition = ok.parent / "list_eval_partition.txt"
    partition.write_text("y.jpg 0\nz.jpg 0\n")
    with pytest.raises(DataNotFoundError, match=r"1 of the 2 images .*z\.jpg"):
        CelebA(ok.parent)
    partition.write_text("y.jpg 0\ny.jpg three\n")
    with pytest.raises(ValueError, match=r"line 2: 'y.jpg three'"):
        CelebA(ok.parent)
    partition.write_text("y.jpg 0\n")
    with pytest.raises(ValueError, match="partition 2"):
        CelebA(ok.parent, split="test")
    with pytest.raises(ValueError, match="size must be"):
        CelebA(ok.parent, size=2)
    with pytest.raises(ValueError, match="'dev'"):
        CelebA(ok.parent, split="dev")
    with pytest.raises(ValueError, match="crop must be a positive int, got 0"):
        CelebA(ok.parent, crop=0)
    lonely = tmp_path / "lonely" / "img_align_celeba"
    _write_jpeg(lonely / "only.jpg", _face(3))
    with pytest.raises(ValueError, match="too few for a 'test' split"):
        CelebA(lonely, split="test")
    with pytest.raises(ValueError, match="root"):
        load_dataset("celeba")


# --------------------------------------------------------------------------- #
# MNIST
# --------------------------------------------------------------------------- #

def _idx_bytes(array, magic=None):
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def _digits(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _write(path, data, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def mnist_root(tmp_path):
    """Plain train files and gzip-compressed test files, with labels."""
    train, test = _digits(7, 1), _digits(3, 2)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(train))
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.arange(7) % 10))
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(test), compress=True)
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes([4, 2, 9]), compress=True)
    return tmp_path, train, test


def test_mnist_pads_to_32_with_zeros(mnist_root):
    root, train, test = mnist_root
    for split, digits in (("train", train), ("test", test)):
        ds = MNIST(root, split=split)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(digits), 1, 32, 32)
        expected = np.zeros((len(digits), 32, 32), np.uint8)
        expected[:, 2:30, 2:30] = digits
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), expected)
    assert MNIST(root, split="test").labels.tolist() == [4, 2, 9]
    assert MNIST(root, split="train", size=2).labels.tolist() == [0, 1]
    via = load_dataset("mnist", root=root, split="train", size=5)
    assert isinstance(via, MNIST) and via.images.shape == (5, 1, 32, 32)
    np.testing.assert_array_equal(via.images[:, 0, 2:30, 2:30].numpy(), train[:5])


def test_mnist_layouts_and_spellings(tmp_path):
    # torchvision's MNIST/raw layout, the dotted file name, no label file.
    digits = _digits(2, 3)
    _write(tmp_path / "MNIST" / "raw" / "train-images.idx3-ubyte", _idx_bytes(digits))
    ds = MNIST(tmp_path)
    assert ds.labels is None and ds.file.name == "train-images.idx3-ubyte"
    np.testing.assert_array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), digits)
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte"):
        MNIST(tmp_path, split="test")


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_bad_files_name_the_file_and_the_value(tmp_path, compress):
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    good = _idx_bytes(_digits(4, 4))
    cases = [
        (_idx_bytes(_digits(4, 4), magic=2049), r"magic number 2049 \(0x00000801\), expected 2051"),
        (good[:-5], r"truncated: its header gives shape \(4, 28, 28\) \(3136 bytes of data\) but it holds 3131"),
        (good[:10], r"10 bytes long, shorter than its 16-byte header"),
        (good[:2], r"2 bytes long, too short for an idx header"),
        (good + b"\0\0", r"2 bytes after the 3136 bytes"),
        (_idx_bytes(np.zeros((2, 27, 28))), r"images of 27x28 pixels, expected 28x28"),
        (_idx_bytes(np.zeros((0, 28, 28))), r"holds no images"),
    ]
    for data, message in cases:
        _write(path, data, compress)
        with pytest.raises(ValueError, match=message) as info:
            MNIST(tmp_path)
        assert str(path) in str(info.value)


def test_mnist_gzip_problems(tmp_path):
    data = _idx_bytes(_digits(2, 5))
    plain = tmp_path / "a" / "train-images-idx3-ubyte"
    _write(plain, data, compress=True)          # compressed, but named as if it were not
    with pytest.raises(ValueError, match=r"magic number 529205248 \(0x1f8b0800\).*gzip-compressed: name it with a \.gz suffix"):
        MNIST(plain.parent)
    broken = tmp_path / "b" / "train-images-idx3-ubyte.gz"
    _write(broken, data)                        # not compressed, but named .gz
    with pytest.raises(ValueError, match=r"cannot decompress MNIST file .*train-images-idx3-ubyte\.gz"):
        MNIST(broken.parent)
    cut = tmp_path / "c" / "train-images-idx3-ubyte.gz"
    _write(cut, gzip.compress(data)[:-12])
    with pytest.raises(ValueError, match=r"cannot decompress MNIST file .*c.train-images-idx3-ubyte\.gz"):
        MNIST(cut.parent)


def test_mnist_labels_and_arguments(tmp_path):
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(_digits(3, 6)))
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes([1, 2]))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds 2 labels for 3 images"):
        MNIST(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros((3, 1))))
    with pytest.raises(ValueError, match="magic number 2050"):
        MNIST(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="size must be"):
        MNIST(tmp_path, size=4)
    with pytest.raises(ValueError, match="must be None or 32, got 28"):
        load_dataset("mnist", root=tmp_path, image_size=28)
    with pytest.raises(DataNotFoundError, match="nothing"):
        MNIST(tmp_path / "nothing")
    assert read_idx(tmp_path / "train-images-idx3-ubyte", 2051).shape == (3, 28, 28)


def test_an_mnist_gzip_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    """A small .gz whose header is MNIST's but which inflates far past its data (here 256 MiB
    of zeros in under 300 kB) is refused after reading its header's worth and a bounded look
    past it, not decompressed whole; a header declaring more than an MNIST file may hold is
    refused before any data is read."""
    import zlib

    reads = []
    real_read = gzip.GzipFile.read

    def counted(self, size=-1):
        data = real_read(self, size)
        reads.append(len(data))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counted)
    bomb = tmp_path / "bomb" / "train-images-idx3-ubyte.gz"
    bomb.parent.mkdir()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip stream
    with open(bomb, "wb") as f:
        f.write(compressor.compress(_idx_bytes(_digits(2, 3))))
        zeros = bytes(2**20)
        for _ in range(256):
            f.write(compressor.compress(zeros))
        f.write(compressor.flush())
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ValueError, match=r"at least 1048576 bytes after the 1568 bytes"):
        MNIST(bomb.parent)
    assert sum(reads) < 2 * 2**20, "decompressed no further than the data and the bounded look past it"

    huge = tmp_path / "huge" / "train-images-idx3-ubyte"
    _write(huge, (2051).to_bytes(4, "big") + (10**9).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(ValueError, match=r"header gives shape \(1000000000, 28, 28\).*more than the 268,435,456"):
        MNIST(huge.parent)
