"""Drawing images from a trained model in batches, and writing them as a PNG grid and ``.npz``.

Latents are drawn on the CPU from a CPU ``torch.Generator`` and then moved to the model's
device, one batch at a time. So a seed gives the same latents on every device and for every
``batch_size``: sampling 1,000 images in batches of 100 draws exactly the latents of one
batch of 1,000. (Decoding different batch sizes can still round differently in the last
float bit; see the tests.)

Memory: only one batch is decoded at a time and each is moved to the CPU (as uint8) before
the next starts, so device memory is bounded by ``batch_size`` whatever ``num``; the
latents of the next batch are drawn on the CPU while the device decodes the current one.
:func:`write_samples` streams the ``.npz`` to disk batch by batch, so host memory is bounded
too: ``python -m rgkern sample --num 100000 --batch-size 4096 --out samples.npz``.

Speed options of :func:`sample_images` (and ``rgkern sample``): ``bf16`` (bfloat16 autocast
for the s/t networks), ``compile`` (``torch.compile`` of the decoder, fullgraph) and
``cuda_graphs`` (compiled with CUDA graphs; CUDA only). With ``compile`` the last, smaller
batch is padded to ``batch_size`` (padding rows are decoded and dropped), so one graph serves
every batch.
"""
from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

from ..core.errors import InputError, InputTypeError, file_error
from ..core.preprocess import postprocess
from .files import create_temporary, remove_orphans
from .plots import check_grid_size, save_image_grid, save_image_groups

if TYPE_CHECKING:
    from ..core.model import RGFlow, Temperature

__all__ = [
    "sample_images",
    "write_samples",
    "parse_temperature",
    "temperature_label",
    "write_sample_groups",
    "check_writable",
    "check_seed",
    "NonFiniteSampleError",
    "BF16_SAMPLE_TOLERANCE",
    "MAX_SEED",
]

#: Seeds are integers in ``0 .. MAX_SEED`` (what ``torch.Generator.manual_seed`` and the
#: trainer's derived seeds take without overflow).
MAX_SEED = 2**63 - 1

#: Bounds on the difference between bf16 and float32 samples of the same latents, which
#: tests/test_speed_options.py checks on its test model (L=32, C=3, n_layers 2, hidden 8,
#: n_res 1, n_mlp 1, random couplings; 16 samples): model space (logits) max abs difference,
#: 8-bit levels max abs difference, and the fraction of 8-bit values that differ at all.
#: Measured there (CPU): 0.002, 1 level, 0.6%; with hidden 64 0.0017, 1 level, 0.4%.
BF16_SAMPLE_TOLERANCE = {"model_space_max_abs": 0.01, "uint8_max_abs": 1, "uint8_fraction_differing": 0.05}


class NonFiniteSampleError(InputError, RuntimeError):
    """Decoded samples held NaN or inf (``indices``: the images, counted from 0); nothing was written."""

    def __init__(self, message: str, indices: Iterable[int]) -> None:
        super().__init__(message)
        self.indices = list(indices)


def parse_temperature(text: str) -> float | list[float]:
    """``"0.8"`` -> ``0.8``; ``"0.2,0.6,0.6,0.6"`` -> ``[0.2, 0.6, 0.6, 0.6]`` (one per RG level).

    Only the syntax is checked here; the model checks the number of levels and the values.
    """
    if not isinstance(text, str):
        raise InputTypeError(f"temperature text must be a str, got {type(text).__name__}")
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(
            f"temperature must be a number or a comma-separated list of numbers (one per RG level), got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def temperature_label(temperature: Temperature) -> str:
    """A temperature as text: ``1.0`` -> ``"1"``, ``[0.2, 0.6, 0.6, 0.6]`` -> ``"0.2,0.6,0.6,0.6"``.

    The inverse of :func:`parse_temperature` up to float formatting (``:g``); the keys of a
    training history's quality scores and the labels of :func:`write_sample_groups`.
    """
    values = temperature if isinstance(temperature, (list, tuple)) else [temperature]
    return ",".join(f"{float(value):g}" for value in values)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


def check_seed(seed: object) -> int:
    """``seed`` if it is an int in ``0 .. MAX_SEED``, else ``ValueError`` (``TypeError``) naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputTypeError(f"seed must be an int in 0 .. {MAX_SEED} (2**63 - 1), got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be an int in 0 .. {MAX_SEED} (2**63 - 1), got {seed}")
    return seed


def _sampling_generator(generator, seed) -> torch.Generator:
    if generator is not None and seed is not None:
        raise InputError("pass either generator or seed, not both")
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(check_seed(seed))
    elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise InputError(
            f"generator must be a CPU torch.Generator (latents are drawn on the CPU), got {generator!r}"
        )
    return generator


def sample_images(
    model: RGFlow,
    num: int,
    batch_size: int = 256,
    temperature: Temperature = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = True,
    compile: bool = False,
    cuda_graphs: bool = False,
    bf16: bool = False,
    allow_nonfinite: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield ``num`` samples of ``model`` as uint8 CPU batches ``(b, C, L, L)``, ``b <= batch_size``.

    Args:
        model: an :class:`rgkern.RGFlow` (any device and dtype).
        num: number of images in all. batch_size: images decoded at once.
        temperature: a float, or one per RG level (see :meth:`RGFlow.temperature_map`).
        generator: a CPU ``torch.Generator`` for the latents, or ``seed`` to make one (neither:
            a random seed).
        progress: show a tqdm bar.
        compile: decode with ``torch.compile(fullgraph=True)`` (backend from
            ``$RGKERN_COMPILE_BACKEND``, default inductor; see
            :func:`rgkern.tools.compile.compile_function`).
        cuda_graphs: compile with ``mode="reduce-overhead"`` (CUDA graphs); needs the model on
            a CUDA device (``ValueError`` otherwise); implies ``compile``.
        bf16: run the decoder under ``torch.autocast(dtype=bfloat16)`` (float32 models only):
            the s/t networks' matrix products run in bfloat16, the coupling arithmetic
            (``exp``, ``tanh``, the affine update) stays float32 (the rows are float32 and
            both the reference and the kernels promote the s/t outputs to them). Measured
            on the test model (random couplings, hidden 8, 16 samples, CPU): bf16 samples
            differ from float32 samples of the same latents by at most 0.002 in model space
            (mean 1e-4) and by 1 level in 8 bits on 0.6% of the values; the tests bound
            them by :data:`BF16_SAMPLE_TOLERANCE` (0.01, 1 level, 5%). Deeper and wider
            models, and larger couplings, accumulate more rounding (0.018 with couplings 3x
            larger; with the authors' initialisation, the paper variant's default, the same
            test model differs by 0.028 at most, mean 6e-4, 1 level on 3.4% of the values).
        allow_nonfinite: a decoded image holding NaN or inf raises
            :class:`NonFiniteSampleError` naming it (the default), before the batch is
            yielded; with True such images are yielded as ``postprocess`` maps them (NaN
            becomes 0) and :func:`write_samples` reports their indices.

    Runs under ``torch.inference_mode()``. Only one batch lives on the device at a time (it
    is copied to the CPU as uint8 before the next is decoded). Arguments (including the
    temperature's length and values) are checked before the first batch is drawn, when
    this function is called.
    """
    if not isinstance(allow_nonfinite, bool):
        raise InputError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
    batches = _checked_batches(model, num, batch_size, temperature, generator, seed, progress, compile, cuda_graphs, bf16)
    return _stop_at_non_finite(batches, temperature) if not allow_nonfinite else (images for images, _ in batches)


def _non_finite_message(indices, temperature) -> str:
    shown = ", ".join(str(i) for i in indices[:8]) + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")
    return (
        f"sampling gave NaN or inf in {len(indices)} image(s) (index {shown}) at temperature {temperature!r}; "
        "nothing was written. The model or the sampler failed numerically: try a lower temperature, "
        "or allow them (sample --allow-nonfinite) to write them with their indices reported"
    )


def _stop_at_non_finite(batches, temperature):
    start = 0
    for images, finite in batches:
        if not bool(finite.all()):
            bad = (start + torch.nonzero(~finite).flatten()).tolist()
            raise NonFiniteSampleError(_non_finite_message(bad, temperature), bad)
        start += images.shape[0]
        yield images


def _checked_batches(model, num, batch_size, temperature, generator, seed, progress, compile, cuda_graphs, bf16):
    """Check the arguments (now) and return the generator of ``(uint8 images, finite (b,) bool)`` batches."""
    num = _check_positive_int("num", num)
    batch_size = _check_positive_int("batch_size", batch_size)
    for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs), ("bf16", bf16)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    model.temperature_map(temperature, device="cpu")  # raises ValueError/TypeError for a bad temperature
    generator = _sampling_generator(generator, seed)
    param = next(model.parameters())
    if bf16 and param.dtype != torch.float32:
        raise InputError(f"bf16 sampling needs a float32 model, got parameters of dtype {param.dtype}")

    def decode(z):
        x = model.decode(z)
        return postprocess(x), torch.isfinite(x).flatten(1).all(dim=1)

    if compile or cuda_graphs:
        from .compile import compile_function

        decode = compile_function(decode, param.device, cuda_graphs=cuda_graphs)
    pad = compile or cuda_graphs
    return _sample_batches(model, decode, num, batch_size, temperature, generator, progress, bf16, pad)


def _sample_batches(model, decode, num, batch_size, temperature, generator, progress, bf16, pad):
    from tqdm.auto import tqdm

    param = next(model.parameters())
    latent_dtype = param.dtype if param.dtype == torch.float64 else torch.float32
    starts = list(range(0, num, batch_size))

    def draw(start):
        count = min(batch_size, num - start)
        with torch.inference_mode():
            return model.sample_latents(count, temperature, generator=generator, device="cpu", dtype=latent_dtype)

    z_next = draw(0)  # before the bar: a batch too large for memory fails without one
    with tqdm(total=num, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        for i in range(len(starts)):
            z = z_next
            count = z.shape[0]
            with torch.inference_mode(), torch.autocast(param.device.type, dtype=torch.bfloat16, enabled=bf16):
                z = z.to(device=param.device, dtype=param.dtype)
                if pad and count < batch_size:  # one shape for the compiled decoder
                    z = torch.cat([z, z.new_zeros((batch_size - count,) + tuple(z.shape[1:]))])
                images, finite = decode(z)
                images, finite = images[:count], finite[:count]
            # Draw the next latents on the CPU while the device decodes (CUDA runs asynchronously).
            z_next = draw(starts[i + 1]) if i + 1 < len(starts) else None
            images, finite = images.cpu(), finite.cpu()
            bar.update(count)
            yield images, finite


def check_writable(path: str | os.PathLike) -> Path:
    """Check that the file ``path`` can be written (creating its folder); returns it as a Path.

    Raises ``OSError`` (``PermissionError`` for permission problems) naming the path when its
    folder cannot be created or written, or when ``path`` is a folder. Writes nothing.
    """
    path = Path(path)
    if path.is_dir():
        raise file_error(errno.EISDIR, f"cannot write {str(path)!r}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.unlink(create_temporary(path, suffix=".probe"))
    except OSError as error:
        raise file_error(
            error.errno, f"cannot write {str(path)!r}: its folder {str(path.parent)!r} is not writable ({error.strerror or error})"
        ) from None
    return path


def _write_error(path: Path, error: OSError) -> OSError:
    """The OSError to raise when writing ``path`` failed half-way (disk full and the like)."""
    return file_error(error.errno, f"cannot write {str(path)!r}: {error.strerror or error}; nothing was written there")


class _NpyStream:
    """Writes one uint8 array ``images`` of known shape into an ``.npz`` batch by batch.

    The archive grows in a temporary file beside ``path`` and replaces ``path`` only when
    complete (:meth:`close` with ``ok``); on any failure the temporary file is removed.
    """

    def __init__(self, path: Path, shape):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(self.path.parent, self.path.name)  # of a sampling run killed earlier
        self.tmp = create_temporary(self.path)  # mode 0666 less the umask, as a plain open
        self.shape = tuple(shape)
        self.written = 0
        try:
            self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self.member = self.zip.open("images.npy", "w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(self.member, header)
        except BaseException:
            self._remove_tmp()
            raise

    def write(self, batch: np.ndarray):
        self.member.write(np.ascontiguousarray(batch).tobytes())
        self.written += batch.shape[0]

    def _remove_tmp(self):
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def close(self, ok: bool):
        """Finish the archive and move it into place (``ok``), or throw it away.

        With ``ok`` a failure to finish (disk full) is raised; without, errors are ignored
        (the caller is already handling one).
        """
        replaced = False
        try:
            self.member.close()
            self.zip.close()
            if ok and self.written == self.shape[0]:
                with open(self.tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(self.tmp, self.path)
                replaced = True
        except BaseException:
            if ok:
                raise
        finally:
            if not replaced:
                self._remove_tmp()


def write_samples(
    model: RGFlow,
    num: int = 64,
    png: str | os.PathLike | None = None,
    npz: str | os.PathLike | None = None,
    batch_size: int = 256,
    temperature: Temperature = 1.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    grid_size: int = 64,
    nrow: int | None = None,
    scale: int = 2,
    progress: bool = True,
    compile: bool = False,
    cuda_graphs: bool = False,
    bf16: bool = False,
    allow_nonfinite: bool = False,
) -> dict:
    """Sample ``num`` images and write them: a PNG grid of the first ``grid_size`` and/or all as ``.npz``.

    Args:
        png: path of the grid image (optional). npz: path of an ``.npz`` holding ``images``,
            uint8 ``(num, C, L, L)`` (optional); it is written batch by batch, so all images
            never sit in memory at once, and appears atomically when complete.
        nrow, scale: grid layout (see :func:`rgkern.tools.plots.save_image_grid`).
        The rest as for :func:`sample_images`.

    Without ``npz`` only the first ``grid_size`` images are drawn.
    Output folders are checked for writing, and the grid's size against
    :data:`rgkern.tools.plots.MAX_GRID_PIXELS`, before anything is sampled
    (:func:`check_writable`); a disk that fills up while writing raises ``OSError`` naming
    the file, and no partial file is left (nor an existing one replaced). An image with NaN
    or inf raises :class:`NonFiniteSampleError` and nothing is written, unless
    ``allow_nonfinite``: then everything is written and the indices are returned.
    Returns ``{"png": Path | None, "npz": Path | None, "num": images drawn, "nonfinite":
    [indices of images with NaN or inf]}``.
    """
    if png is None and npz is None:
        raise InputError("give png and/or npz: there is nowhere to write the samples")
    grid_size = _check_positive_int("grid_size", grid_size)
    if not isinstance(allow_nonfinite, bool):
        raise InputError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
    batches = _checked_batches(
        model, num, batch_size, temperature, generator, seed, progress, compile, cuda_graphs, bf16,
    )
    if png is not None:
        check_grid_size(min(grid_size, num), model.channels, model.image_size, model.image_size, nrow=nrow, scale=scale)
    png = None if png is None else check_writable(png)
    npz = None if npz is None else check_writable(npz)
    shape = (num, model.channels, model.image_size, model.image_size)
    try:
        stream = _NpyStream(npz, shape) if npz is not None else None
    except OSError as error:
        raise _write_error(npz, error) from error
    grid: list[torch.Tensor] = []
    kept = drawn = 0
    nonfinite: list[int] = []
    ok = False
    try:
        for images, finite in batches:
            if not bool(finite.all()):
                bad = (drawn + torch.nonzero(~finite).flatten()).tolist()
                if not allow_nonfinite:
                    raise NonFiniteSampleError(_non_finite_message(bad, temperature), bad)
                nonfinite += bad
            drawn += images.shape[0]
            if kept < grid_size:
                grid.append(images[: grid_size - kept])
                kept += grid[-1].shape[0]
            if stream is not None:
                try:
                    stream.write(images.numpy())
                except OSError as error:
                    raise _write_error(npz, error) from error
            elif kept >= grid_size:
                break
        ok = True
    finally:
        if stream is not None and not ok:
            stream.close(False)
    if stream is not None:
        try:
            stream.close(True)
        except OSError as error:  # the end of the archive could not be written
            raise _write_error(npz, error) from error
    if png is not None:  # atomically, like the .npz: a failed write leaves an older grid as it was
        pictures = torch.cat(grid)

        save_image_grid(pictures, png, nrow=nrow, scale=scale)  # atomic: see rgkern.tools.plots
    return {
        "png": None if png is None else Path(png),
        "npz": None if npz is None else Path(npz),
        "num": drawn,
        "nonfinite": nonfinite,
    }


def write_sample_groups(model: RGFlow, png: str | os.PathLike, temperatures: list, num: int = 64, seed: int = 0, nrow: int | None = None, scale: int = 2,
                        batch_size: int = 256, progress: bool = True) -> dict:
    """Sample ``num`` images at each of ``temperatures`` and write them as one PNG, a labelled row group per temperature.

    Every temperature decodes the same latents drawn with ``seed`` (the priors are scale
    families, so the groups show the same samples hotter and colder, as flow papers do).
    The groups run top to bottom in the order given, each under the label ``"temperature
    T"`` (:func:`temperature_label`); layout as in :func:`rgkern.tools.plots.save_image_groups`.
    Temperatures, the folder and the picture's size are checked before anything is
    sampled; a decode that gives NaN or inf raises :class:`NonFiniteSampleError` and writes
    nothing. Returns ``{"png": Path, "images": {label: uint8 (num, C, L, L)}}``.
    """
    if not isinstance(temperatures, (list, tuple)) or not temperatures:
        raise InputError(f"temperatures must be a non-empty list (each a float or one per RG level), got {temperatures!r}")
    num = _check_positive_int("num", num)
    for temperature in temperatures:
        model.temperature_map(temperature, device="cpu")
    check_grid_size(num, model.channels, model.image_size, model.image_size, nrow=nrow, scale=scale)
    png = check_writable(png)
    groups = [
        torch.cat(list(sample_images(model, num, batch_size=batch_size, temperature=t, seed=seed, progress=progress)))
        for t in temperatures
    ]
    labels = [temperature_label(t) for t in temperatures]
    save_image_groups(groups, [f"temperature {label}" for label in labels], png, nrow=nrow, scale=scale)
    return {"png": Path(png), "images": dict(zip(labels, groups))}
