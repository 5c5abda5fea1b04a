"""Frozen copy of the first parameter layout of RGFlow (checkpoint format 1): the oracle of tests/test_lean_path.py.

One ``nn.Linear`` (with ``torch.nn.utils.parametrizations.weight_norm``) per layer, separate
s and t networks per coupling half-step, names ``sublayers.S.blocks.B.halves.H.*``. Kept
as it was written, apart from imports, so that the stacked layout of
:mod:`rgkern.core.model` can be checked against it to float64 rounding. Do not edit.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from rgkern.core import ops
from rgkern.core.geometry import Geometry, get_geometry
from rgkern.core.priors import make_prior

__all__ = ["RGFlow", "Swish", "ResidualMLP", "AffineCoupling", "RNVPBlock", "Sublayer"]


class Swish(nn.Module):
    """``x * sigmoid(beta * x)`` with a learned per-feature slope ``beta`` (starts at 1)."""

    def __init__(self, features: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class ResidualMLP(nn.Module):
    """``dim -> hidden -> ... -> dim`` residual network used for ``s`` and ``t``.

    ``n_res`` residual blocks ``x <- (x + f(x)) / sqrt(2)``; ``f`` is [Swish, weight-normalised
    Linear] repeated ``n_mlp + 1`` times with widths ``dim, hidden, ..., hidden, dim``.
    """

    def __init__(self, dim: int, hidden: int, n_res: int, n_mlp: int):
        super().__init__()
        widths = [dim] + [hidden] * n_mlp + [dim]
        self.blocks = nn.ModuleList()
        for _ in range(n_res):
            layers = []
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                layers += [Swish(w_in), weight_norm(nn.Linear(w_in, w_out))]
            self.blocks.append(nn.Sequential(*layers))

    def forward(self, x):
        for block in self.blocks:
            x = (x + block(x)) * (1 / math.sqrt(2))
        return x


class AffineCoupling(nn.Module):
    """One coupling half-step on patch rows ``(N, D)`` (see :func:`rgkern.reference.affine_coupling`).

    ``s`` and ``t`` are computed from the masked rows; their learned output scales start at
    zero, so the half-step starts as the identity.
    """

    def __init__(self, dim: int, hidden: int, n_res: int, n_mlp: int, flipped: bool):
        super().__init__()
        self.flipped = flipped
        self.s_net = ResidualMLP(dim, hidden, n_res, n_mlp)
        self.t_net = ResidualMLP(dim, hidden, n_res, n_mlp)
        self.s_scale = nn.Parameter(torch.zeros(dim))
        self.t_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, rows, mask, inverse: bool, backend: str):
        conditioner = rows * mask
        s_raw = self.s_net(conditioner)
        t_raw = self.t_net(conditioner)
        return ops.affine_coupling(rows, s_raw, t_raw, self.s_scale, self.t_scale, mask, inverse, backend)


class RNVPBlock(nn.Module):
    """Two coupling half-steps with the checkerboard mask and its complement."""

    def __init__(self, dim: int, hidden: int, n_res: int, n_mlp: int):
        super().__init__()
        self.halves = nn.ModuleList([AffineCoupling(dim, hidden, n_res, n_mlp, flipped) for flipped in (False, True)])


class Sublayer(nn.Module):
    """A disentangler or decimator: a stack of RNVP blocks applied to every patch of a sublayer.

    All ``B*P`` patches share the weights. ``forward(x)`` returns the new image and the
    per-sample log-det ``(B,)`` of this sublayer (float64 for float64 input, else float32).
    """

    def __init__(self, geometry: Geometry, index: int, n_layers: int, hidden: int, n_res: int, n_mlp: int):
        super().__init__()
        self.geometry = geometry
        self.index = index
        self.blocks = nn.ModuleList([RNVPBlock(geometry.patch_dim, hidden, n_res, n_mlp) for _ in range(n_layers)])

    def extra_repr(self) -> str:
        return self.geometry.sublayers[self.index].name

    def transform_rows(self, rows: torch.Tensor, inverse: bool, backend: str):
        """Run the block stack on patch rows ``(N, D)``; returns rows and per-row log-det ``(N,)``."""
        masks = [self.geometry.coupling_mask(rows.device, rows.dtype, flipped) for flipped in (False, True)]
        logdet = rows.new_zeros(rows.shape[0], dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)
        half_steps = [(half, masks[half.flipped]) for block in self.blocks for half in block.halves]
        for half, mask in reversed(half_steps) if inverse else half_steps:
            rows, ld = half(rows, mask, inverse, backend)
            logdet = logdet + ld
        return rows, logdet

    def forward(self, x: torch.Tensor, inverse: bool = False, backend: str = "torch"):
        row_index = self.geometry.row_index(self.index, x.device)
        rows = ops.gather_patches(x, row_index, backend)
        rows, logdet = self.transform_rows(rows, inverse, backend)
        return ops.scatter_patches(x, rows, row_index, backend), logdet.view(x.shape[0], -1).sum(dim=1)


def _per_level(name: str, value, num_levels: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * num_levels
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = tuple(value)
        if len(values) != num_levels:
            raise ValueError(
                f"{name} has {len(values)} entries {values}, expected one per RG level ({num_levels} levels)"
            )
    else:
        raise TypeError(f"{name} must be an int or a tuple of {num_levels} ints, got {value!r}")
    minimum = 0 if name in ("n_mlp", "n_layers") else 1
    if any(v < minimum for v in values):
        raise ValueError(f"{name} entries must be >= {minimum}, got {values}")
    return values


def default_n_layers(num_levels: int) -> tuple[int, ...]:
    """The paper's ``(8, 6, 4, 2)`` blocks per level for H = 4, continued with 2 above."""
    return tuple(max(2, 8 - 2 * h) for h in range(num_levels))


class RGFlow(nn.Module):
    """RG-Flow normalizing flow on ``(B, C, L, L)`` images, ``L = kernel_size * 2**n``.

    Args:
        image_size: L. channels: C. kernel_size: k (patch edge, even).
        n_layers: RNVP blocks per sublayer, an int or one per level (len H); ``None`` is the
            paper's ``(8, 6, 4, 2)`` at H = 4 and ``max(2, 8 - 2h)`` per level otherwise.
        hidden, n_res, n_mlp: width, residual blocks and hidden layers of the s/t networks,
            an int or one per level; both sublayers of a level share the level's values.
        prior: ``"laplace"`` (default) or ``"gaussian"``.
        backend: ``"auto"`` (Triton on CUDA tensors, the reference elsewhere), ``"torch"``
            or ``"triton"``.

    Defaults are the paper's CelebA/CIFAR model (DESIGN.md section 1).
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        kernel_size: int = 4,
        n_layers=None,
        hidden=512,
        n_res=4,
        n_mlp=2,
        prior: str = "laplace",
        backend: str = "auto",
    ):
        super().__init__()
        self.geometry = get_geometry(image_size, kernel_size, channels)
        H = self.geometry.num_levels
        if n_layers is None:
            n_layers = default_n_layers(H)
        if isinstance(n_layers, Sequence) and len(n_layers) != H:
            raise ValueError(
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
        )
        self.prior = make_prior(prior)
        self.backend = ops.check_backend(backend)
        self.check_inputs = True
        cfg = self.config
        self.sublayers = nn.ModuleList(
            Sublayer(self.geometry, s.index, cfg["n_layers"][s.level], cfg["hidden"][s.level], cfg["n_res"][s.level], cfg["n_mlp"][s.level])
            for s in self.geometry.sublayers
        )

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

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def extra_repr(self) -> str:
        return f"prior={self.prior.name!r}, backend={self.backend!r}"

    # ----------------------------------------------------------------- checks
    def _check_images(self, x, name: str, check_finite: bool):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        C, L = self.channels, self.image_size
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, L, L) = (B, {C}, {L}, {L}), got shape {tuple(x.shape)}")
        if x.shape[1] != C:
            raise ValueError(f"{name} has {x.shape[1]} channels, the model expects {C} (shape {tuple(x.shape)})")
        if tuple(x.shape[2:]) != (L, L):
            raise ValueError(f"{name} has spatial size {tuple(x.shape[2:])}, the model expects ({L}, {L})")
        param = self._param()
        if x.dtype != param.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the model parameters are {param.dtype}; "
                f"convert one of them (e.g. x.to({param.dtype}) or model.to({x.dtype}))"
            )
        if x.device != param.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {param.device}; move one of them")
        if check_finite and self.check_inputs and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf); expected finite values")

    # ----------------------------------------------------------------- flow
    def encode(self, x: torch.Tensor):
        """``x (B, C, L, L) -> (z (B, C, L, L), logdet (B,))`` with ``logdet = log|det dz/dx|``."""
        self._check_images(x, "x", check_finite=True)
        backend = ops.resolve_backend(self.backend, x)
        logdet = x.new_zeros(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        for sublayer in self.sublayers:
            x, ld = sublayer(x, inverse=False, backend=backend)
            logdet = logdet + ld
        return x, logdet

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`encode`: ``z (B, C, L, L) -> x (B, C, L, L)``."""
        self._check_images(z, "z", check_finite=False)
        backend = ops.resolve_backend(self.backend, z)
        for sublayer in reversed(self.sublayers):
            z, _ = sublayer(z, inverse=True, backend=backend)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-density of ``x`` in model space, in nats: ``log p(z) + logdet``."""
        z, logdet = self.encode(x)
        return self.prior.log_prob(z).flatten(1).sum(dim=1).to(logdet.dtype) + logdet

    def temperature_map(self, temperature, device=None, dtype=torch.float32) -> torch.Tensor:
        """Per-latent temperature ``(C, L, L)`` from a float or one temperature per level (len H)."""
        H = self.num_levels
        if isinstance(temperature, torch.Tensor) and temperature.dim() == 0:
            temperature = float(temperature)
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            per_level = [float(temperature)] * H
        else:
            try:
                per_level = [float(t) for t in temperature]
            except TypeError:
                raise TypeError(f"temperature must be a float or a sequence of {H} floats, got {temperature!r}") from None
            if len(per_level) != H:
                raise ValueError(
                    f"temperature has {len(per_level)} entries {per_level}, expected one per RG level ({H} levels)"
                )
        if any(not math.isfinite(t) or t < 0 for t in per_level):
            raise ValueError(f"temperatures must be finite and >= 0, got {per_level}")
        device = self._param().device if device is None else torch.device(device)
        table = torch.tensor(per_level, dtype=dtype, device=device)
        return table[self.geometry.latent_level_of_elements(device)]

    def sample_latents(self, n: int, temperature=1.0, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Draw ``(n, C, L, L)`` latents from the prior at a temperature (float or one per level).

        Sample ``i`` gets the ``i``-th draw from ``generator``: drawing ``a`` then ``b``
        samples gives the same latents as drawing ``a + b`` at once.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"number of samples must be a positive int, got {n!r}")
        param = self._param()
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        temps = self.temperature_map(temperature, device, dtype)
        # One draw per sample, so the latents of sample i do not depend on how many samples
        # are drawn per call (chunked sampling reproduces one big batch).
        shape = (1, self.channels, self.image_size, self.image_size)
        draws = [self.prior.sample(shape, temps, generator=generator, device=device, dtype=dtype) for _ in range(n)]
        return torch.cat(draws)

    def sample(self, n: int, temperature=1.0, generator=None, batch_size: int | None = None) -> torch.Tensor:
        """``n`` samples ``(n, C, L, L)`` in model space; temperature: float or one per level.

        With ``batch_size`` the latents are drawn and decoded in chunks of that many samples
        (bounding the activation memory); the latents come from ``generator`` in the same
        order either way, so on the CPU chunked and unchunked sampling give the same images.
        Runs under ``torch.inference_mode()``. For more samples than fit in memory at once,
        stream them with :func:`rgkern.sampling.sample_images`.
        """
        if batch_size is None:
            batch_size = n
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        with torch.inference_mode():
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"number of samples must be a positive int, got {n!r}")
            chunks = [
                self.decode(self.sample_latents(min(batch_size, n - start), temperature, generator))
                for start in range(0, n, batch_size)
            ]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
