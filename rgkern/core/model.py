"""The RG-Flow model :class:`RGFlow`: its sublayers (disentanglers and decimators) and prior.

``x`` of shape ``(B, C, L, L)`` maps bijectively to latents ``z`` of the same shape; the
latent at pixel position ``(i, j)`` belongs to RG level ``model.levels[i, j]``.

The sublayers are :class:`~rgkern.core.sublayer.Sublayer` (RNVP blocks on every patch of
the sublayer); their ``s`` and ``t`` networks, and the stacked parameter layout of those,
are :mod:`rgkern.core.networks`.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import nn

from . import ops
from .errors import InputError, InputTypeError
from .geometry import check_image_size, get_geometry
from .networks import INITS
from .priors import make_prior
from .sublayer import Sublayer

__all__ = ["RGFlow", "VARIANTS", "INITS", "DEFAULT_INIT", "default_n_layers", "weight_count"]

#: Model variants (docs/design.md section 8). "paper": eq. 6-9 of the paper, the disentangler of a
#: level before its decimator, and each coupling half-step with its own (s, t) networks.
#: "authors": the authors' published code, the decimator (offset 0) first, and one (s, t)
#: pair per RNVP block shared by its two half-steps.
VARIANTS = ("paper", "authors")

#: Each variant's initialisation when none is given: the one that learned faster on the CPU
#: demo (preset cpu, 2,000 steps, seeds 0 and 1; README, "Initialisation"). Held-out bits/dim,
#: mean of the two seeds: paper 3.108 with "authors" against 3.176 with "torch"; authors 3.045
#: with "torch" against 3.105 with "authors".
DEFAULT_INIT = {"paper": "authors", "authors": "torch"}

#: A sampling temperature: one real number for every RG level, or one per level (a 0-d tensor
#: counts as a number; :meth:`RGFlow.temperature_map`).
Temperature = float | Sequence[float] | torch.Tensor


def _per_level(name: str, value: int | Sequence[int], num_levels: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * num_levels
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = tuple(value)
        if len(values) != num_levels:
            raise InputError(
                f"{name} has {len(values)} entries {values}, expected one per RG level ({num_levels} levels)"
            )
    else:
        raise InputTypeError(f"{name} must be an int or a tuple of {num_levels} ints, got {value!r}")
    minimum = 0 if name in ("n_mlp", "n_layers") else 1
    if any(v < minimum for v in values):
        raise InputError(f"{name} entries must be >= {minimum}, got {values}")
    return values


def default_n_layers(num_levels: int) -> tuple[int, ...]:
    """The paper's ``(8, 6, 4, 2)`` blocks per level for H = 4, continued with 2 above."""
    return tuple(max(2, 8 - 2 * h) for h in range(num_levels))


def weight_count(config: dict) -> int:
    """The number of weights ``RGFlow(**config)`` holds, from its config alone (nothing allocated).

    ``config`` as :attr:`RGFlow.config`. Per sublayer and pair of networks, each of the two
    networks' residual blocks holds per linear ``w_in`` slopes, ``w_out * w_in`` directions,
    ``w_out`` magnitudes and ``w_out`` biases (widths ``D, hidden, ..., hidden, D``), and the
    pair its ``2 * D`` output scales; a level has two sublayers of ``2 * n_layers`` pairs
    (``n_layers`` in variant "authors"). Raises the constructor's errors for a config it refuses.
    """
    image_size, kernel_size, channels = config.get("image_size"), config.get("kernel_size"), config.get("channels")
    H = check_image_size(image_size, kernel_size)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise InputTypeError(f"channels must be a positive int, got {channels!r}")
    variant = config.get("variant", "paper")
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    D = channels * kernel_size * kernel_size
    n_layers = _per_level("n_layers", config.get("n_layers", default_n_layers(H)), H)
    hidden = _per_level("hidden", config.get("hidden", 512), H)
    n_res = _per_level("n_res", config.get("n_res", 4), H)
    n_mlp = _per_level("n_mlp", config.get("n_mlp", 2), H)
    total = 0
    for h in range(H):
        widths = [D] + [hidden[h]] * n_mlp[h] + [D]
        per_block = sum(w_in + w_out * w_in + 2 * w_out for w_in, w_out in zip(widths[:-1], widths[1:]))
        pairs = n_layers[h] * (2 if variant == "paper" else 1)
        total += 2 * pairs * (n_res[h] * 2 * per_block + 2 * D)
    return total


class RGFlow(nn.Module):
    """RG-Flow normalizing flow on ``(B, C, L, L)`` images, ``L = kernel_size * 2**n``.

    Args:
        image_size: L. channels: C. kernel_size: k (patch edge, even).
        n_layers: RNVP blocks per sublayer, an int or one per level (len H); ``None`` is the
            paper's ``(8, 6, 4, 2)`` at H = 4 and ``max(2, 8 - 2h)`` per level otherwise.
        hidden, n_res, n_mlp: width, residual blocks and hidden layers of the s/t networks,
            an int or one per level; both sublayers of a level share the level's values.
        prior: ``"laplace"`` (default) or ``"gaussian"``.
        variant: ``"paper"`` (default: the paper's eq. 6-9, separate (s, t) networks per
            half-step) or ``"authors"`` (the authors' published code: per level the offset-0
            sublayer first, one (s, t) pair per RNVP block); see :data:`VARIANTS`.
        init: initialisation of the linears, ``"torch"`` or ``"authors"`` (:data:`INITS`);
            None is the variant's default (:data:`DEFAULT_INIT`). Not part of
            :attr:`config`: a loaded checkpoint overwrites it.
        backend: ``"auto"`` (Triton on CUDA tensors, the reference elsewhere), ``"torch"``
            or ``"triton"``.
        activation_checkpointing: recompute each RNVP block's activations in the backward
            pass instead of saving them (less memory, about one more forward pass of work);
            not part of :attr:`config`, since it does not change the function. Also
            settable later as :attr:`activation_checkpointing`.

    Defaults are the paper's CelebA/CIFAR model (docs/design.md section 1).
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        kernel_size: int = 4,
        n_layers: int | Sequence[int] | None = None,
        hidden: int | Sequence[int] = 512,
        n_res: int | Sequence[int] = 4,
        n_mlp: int | Sequence[int] = 2,
        prior: str = "laplace",
        backend: str = "auto",
        activation_checkpointing: bool = False,
        variant: str = "paper",
        init: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise InputError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if init is None:
            init = DEFAULT_INIT[variant]
        if init not in INITS:
            raise InputError(f"unknown init {init!r}; expected one of {INITS} (or None for the variant's default)")
        self.init = init
        self.geometry = get_geometry(image_size, kernel_size, channels, variant)
        H = self.geometry.num_levels
        if n_layers is None:
            n_layers = default_n_layers(H)
        if isinstance(n_layers, Sequence) and len(n_layers) != H:
            raise InputError(
                f"n_layers has {len(n_layers)} entries {tuple(n_layers)}, but image_size={image_size} "
                f"with kernel_size={kernel_size} has {H} RG levels; give one entry per level"
            )
        self.config = dict(
            image_size=image_size,
            channels=channels,
            kernel_size=kernel_size,
            n_layers=_per_level("n_layers", n_layers, H),
            hidden=_per_level("hidden", hidden, H),
            n_res=_per_level("n_res", n_res, H),
            n_mlp=_per_level("n_mlp", n_mlp, H),
            prior=prior,
            variant=variant,
        )
        self.prior = make_prior(prior)
        self.backend = ops.check_backend(backend)
        self.check_inputs = True
        cfg = self.config
        networks_per_block = 2 if variant == "paper" else 1
        self.sublayers = nn.ModuleList(
            Sublayer(self.geometry, s.index, cfg["n_layers"][s.level], cfg["hidden"][s.level], cfg["n_res"][s.level],
                     cfg["n_mlp"][s.level], networks_per_block, init)
            for s in self.geometry.sublayers
        )
        self.activation_checkpointing = activation_checkpointing

    # ----------------------------------------------------------------- properties
    @property
    def image_size(self) -> int:
        return self.geometry.image_size

    @property
    def channels(self) -> int:
        return self.geometry.channels

    @property
    def num_levels(self) -> int:
        return self.geometry.num_levels

    @property
    def levels(self) -> torch.Tensor:
        """LongTensor ``(L, L)`` (CPU): RG level of the latent at each pixel position."""
        return self.geometry.levels

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size**2

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each RNVP block in the backward pass instead of saving its activations."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise InputTypeError(f"activation_checkpointing must be True or False, got {enabled!r}")
        self._activation_checkpointing = enabled
        for sublayer in self.sublayers:
            sublayer.activation_checkpointing = enabled

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    @property
    def variant(self) -> str:
        return self.config["variant"]

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, prior={self.prior.name!r}, backend={self.backend!r}"

    # ----------------------------------------------------------------- checks
    def check_images(self, x: torch.Tensor, name: str, check_finite: bool) -> None:
        """Check that ``x`` is a ``(B, C, L, L)`` tensor this model can take, else raise.

        ``TypeError`` for a non-tensor or a dtype other than the parameters'; ``ValueError``
        for another shape, channel count or device, and (with ``check_finite``, unless
        ``check_inputs`` is off or ``torch.compile`` is tracing) for NaN or inf. ``name``
        names ``x`` in the messages.
        """
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        C, L = self.channels, self.image_size
        if x.dim() != 4:
            raise InputError(f"{name} must be 4-D (B, C, L, L) = (B, {C}, {L}, {L}), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InputError(f"{name} holds no images (batch size 0, shape {tuple(x.shape)}); expected at least one")
        if x.shape[1] != C:
            raise InputError(f"{name} has {x.shape[1]} channels, the model expects {C} (shape {tuple(x.shape)})")
        if tuple(x.shape[2:]) != (L, L):
            raise InputError(f"{name} has spatial size {tuple(x.shape[2:])}, the model expects ({L}, {L})")
        param = self._param()
        if x.dtype != param.dtype:
            raise InputTypeError(
                f"{name} has dtype {x.dtype} but the model parameters are {param.dtype}; "
                f"convert one of them (e.g. x.to({param.dtype}) or model.to({x.dtype}))"
            )
        if x.device != param.device:
            raise InputError(f"{name} is on {x.device} but the model is on {param.device}; move one of them")
        if check_finite and self.check_inputs and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise InputError(f"{name} contains {bad} non-finite values (NaN or inf); expected finite values")

    # ----------------------------------------------------------------- flow
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, L, L) -> (z (B, C, L, L), logdet (B,))`` with ``logdet = log|det dz/dx|``.

        With :attr:`check_inputs` (the default) a non-finite ``x``, and a finite ``x`` whose
        latents or log-det come out non-finite (values far outside the model's range), raise
        ``ValueError``: one host sync, on the outputs (a non-finite pixel of ``x`` leaves its
        latent non-finite, so the input is looked at only when they are). Not under
        ``torch.compile``, which traces no data-dependent check: a compiled model returns NaN for
        such input.
        """
        self.check_images(x, "x", check_finite=False)
        backend = ops.resolve_backend(self.backend, x)
        z, logdet = x, None
        for sublayer in self.sublayers:
            z, ld = sublayer(z, inverse=False, backend=backend)
            logdet = ld if logdet is None else logdet + ld
        if self.check_inputs and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(z).all() & torch.isfinite(logdet).all()):
                self.check_images(x, "x", check_finite=True)  # names a non-finite input as such
                raise InputError(
                    f"x is finite but its latents or log-det are not (largest |x| = {float(x.abs().max()):.3g}): it lies "
                    "far outside the range the model was trained on; bring images into it with rgkern.preprocess"
                )
        return z, logdet

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`encode`: ``z (B, C, L, L) -> x (B, C, L, L)``.

        ``z`` is not checked for NaN or inf, and non-finite latents give non-finite pixels (the
        sampling tools find and report non-finite images).
        """
        self.check_images(z, "z", check_finite=False)
        backend = ops.resolve_backend(self.backend, z)
        for sublayer in reversed(self.sublayers):
            z, _ = sublayer(z, inverse=True, backend=backend)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-density of ``x`` in model space, in nats: ``log p(z) + logdet``."""
        z, logdet = self.encode(x)
        return self.prior.log_prob_sum(z).to(logdet.dtype) + logdet

    #: The largest temperature :meth:`temperature_map` accepts: latents stay far from the
    #: float32 range through the decode (a Laplace draw times 1e4 is below 1e6 in magnitude).
    MAX_TEMPERATURE = 1e4

    def temperature_map(self, temperature: Temperature, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-latent temperature ``(C, L, L)`` from a float or one temperature per level (len H).

        Each temperature is a real number in ``[0, MAX_TEMPERATURE]``; strings are refused
        (``TypeError``), a wrong number of levels or a value out of range is a ``ValueError``.
        """
        H = self.num_levels
        expected = f"temperature must be a float or a sequence of {H} floats (one per RG level), got {temperature!r}"

        def number(t: object) -> float:
            if isinstance(t, torch.Tensor) and t.dim() == 0:
                t = t.item()
            if isinstance(t, numbers.Real) and not isinstance(t, bool):
                return float(t)
            raise InputTypeError(expected)

        if isinstance(temperature, (str, bytes)):  # else "0555" would read as four levels
            raise InputTypeError(f"{expected}; parse text first (rgkern.tools.sampling.parse_temperature)")
        if isinstance(temperature, numbers.Real) or isinstance(temperature, torch.Tensor) and temperature.dim() == 0:
            per_level = [number(temperature)] * H
        else:
            try:
                per_level = [number(t) for t in temperature]
            except TypeError:
                raise InputTypeError(expected) from None
            if len(per_level) != H:
                raise InputError(
                    f"temperature has {len(per_level)} entries {per_level}, expected one per RG level ({H} levels)"
                )
        if any(not math.isfinite(t) or t < 0 or t > self.MAX_TEMPERATURE for t in per_level):
            raise InputError(
                f"temperatures must be finite, >= 0 and <= {self.MAX_TEMPERATURE:g} (beyond that samples overflow), "
                f"got {per_level}"
            )
        device = self._param().device if device is None else torch.device(device)
        table = torch.tensor(per_level, dtype=dtype, device=device)
        return table[self.geometry.latent_level_of_elements(device)]

    def sample_latents(self, n: int, temperature: Temperature = 1.0, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw ``(n, C, L, L)`` latents from the prior at a temperature (float or one per level).

        Sample ``i`` gets the ``i``-th draw from ``generator``: drawing ``a`` then ``b``
        samples gives the same latents as drawing ``a + b`` at once. With a CPU generator
        (or none, on the CPU) all ``n`` samples are drawn in one call: the CPU generator
        fills a tensor element by element in order, so a batch is the concatenation of
        its chunks. A CUDA generator (Philox) lays its draws out by the launch grid, which
        depends on the tensor's size, so with one the samples are drawn one call each.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"number of samples n must be a positive int, got {n!r}")
        param = self._param()
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        temps = self.temperature_map(temperature, device, dtype)
        shape = (self.channels, self.image_size, self.image_size)
        if generator is not None and generator.device.type != "cpu":
            draws = [self.prior.sample((1, *shape), temps, generator=generator, device=device, dtype=dtype) for _ in range(n)]
            return torch.cat(draws)
        return self.prior.sample((n, *shape), temps, generator=generator, device=device, dtype=dtype)

    def sample(self, n: int, temperature: Temperature = 1.0, generator: torch.Generator | None = None,
               batch_size: int | None = None) -> torch.Tensor:
        """``n`` samples ``(n, C, L, L)`` in model space; temperature: float or one per level.

        With ``batch_size`` the latents are drawn and decoded in chunks of that many samples
        (bounding the activation memory); the latents come from ``generator`` in the same
        order either way, so on the CPU chunked and unchunked sampling give the same images.
        Runs under ``torch.inference_mode()``. For more samples than fit in memory at once,
        stream them with :func:`rgkern.tools.sampling.sample_images`.
        """
        if batch_size is None:
            batch_size = n
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"number of samples n must be a positive int, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        with torch.inference_mode():
            chunks = [
                self.decode(self.sample_latents(min(batch_size, n - start), temperature, generator))
                for start in range(0, n, batch_size)
            ]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
