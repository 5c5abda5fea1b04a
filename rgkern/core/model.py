"""The RG-Flow model: RNVP couplings, sublayers (disentanglers and decimators) and priors.

``x`` of shape ``(B, C, L, L)`` maps bijectively to latents ``z`` of the same shape; the
latent at pixel position ``(i, j)`` belongs to RG level ``model.levels[i, j]``.

Parameter layout (the "lean path"). A sublayer runs ``2 * n_layers`` coupling half-steps in
sequence, each with an ``s`` and a ``t`` residual MLP that read the same masked patch rows.
Rather than one ``nn.Linear`` per layer, every weight of a sublayer lives in a few stacked
tensors, indexed ``[half-step, residual block, network (0 = s, 1 = t), ...]``:

* ``slopes[j]``   ``(P, n_res, 2, 1, w_in)``      the Swish slope before linear ``j``;
* ``directions[j]`` ``(P, n_res, 2, w_out, w_in)`` the weight-norm direction ``v``;
* ``magnitudes[j]`` ``(P, n_res, 2, w_out, 1)``   the weight-norm magnitude ``g``;
* ``biases[j]``   ``(P, n_res, 2, 1, w_out)``;
* ``s_scale``, ``t_scale`` ``(P, D)``             the learned output scales (start at zero);

with ``j = 0 .. n_mlp`` the linears of a residual block (widths ``D, hidden, ..., hidden, D``)
and ``P = 2 * n_layers``. So a pass computes the weight norm ``g * v / ||v||`` once per
sublayer and stacked tensor (one op, not one per linear), casts the weights once under
autocast, and runs the ``s`` and ``t`` networks of a half-step together: each layer is one
batched GEMM (``torch.baddbmm``) on a ``(2, N, width)`` stack, with the residual
``(x + f(x)) / sqrt(2)`` folded into the GEMM of the block's last linear.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from . import ops, reference
from .errors import InputError, InputTypeError
from .geometry import Geometry, get_geometry
from .precision import accumulator_dtype
from .priors import make_prior

__all__ = [
    "RGFlow",
    "VARIANTS",
    "INITS",
    "DEFAULT_INIT",
    "CouplingNetworks",
    "PreparedNetworks",
    "Sublayer",
    "default_n_layers",
    "is_legacy_state_dict",
    "convert_legacy_state_dict",
]

SQRT_HALF = 1 / math.sqrt(2)
NETWORKS = 2  # s and t

#: Model variants (DESIGN.md section 8). "paper": eq. 6-9 of the paper, the disentangler of a
#: level before its decimator, and each coupling half-step with its own (s, t) networks.
#: "authors": the authors' published code, the decimator (offset 0) first, and one (s, t)
#: pair per RNVP block shared by its two half-steps.
VARIANTS = ("paper", "authors")

#: Initialisations of the linears. "torch": PyTorch's nn.Linear default, weights and biases
#: uniform in +-1/sqrt(fan_in). "authors": the authors' code, weights uniform in
#: +-sqrt(2.81 * 3 / fan_in) (2.81: their gain for Swish) and zero biases. In both the
#: weight-norm magnitude starts at ||v||, Swish slopes at 1 and the output scales at 0.
INITS = ("torch", "authors")

#: Each variant's initialisation when none is given: the one that learned faster on the CPU
#: demo (preset cpu, 2,000 steps, seeds 0 and 1; README, "Initialisation"). Held-out bits/dim,
#: mean of the two seeds: paper 3.108 with "authors" against 3.176 with "torch"; authors 3.045
#: with "torch" against 3.105 with "authors".
DEFAULT_INIT = {"paper": "authors", "authors": "torch"}


def _autocast_dtype(device: torch.device):
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class CouplingNetworks(nn.Module):
    """The ``s`` and ``t`` residual MLPs of ``pairs`` coupling half-steps, stacked (see the module docstring).

    ``n_res`` residual blocks ``x <- (x + f(x)) / sqrt(2)``; ``f`` is [Swish
    ``x * sigmoid(slope * x)`` with a learned per-feature slope, then a weight-normalised
    Linear] repeated ``n_mlp + 1`` times with widths ``dim, hidden, ..., hidden, dim``.
    ``init`` is one of :data:`INITS`; with either, ``g = ||v||``, slopes start at 1 and the
    output scales at 0, so every half-step starts as the identity.
    """

    def __init__(self, pairs: int, dim: int, hidden: int, n_res: int, n_mlp: int, init: str = "torch"):
        super().__init__()
        if init not in INITS:
            raise InputError(f"unknown init {init!r}; expected one of {INITS}")
        self.pairs, self.dim, self.n_res, self.n_mlp = pairs, dim, n_res, n_mlp
        widths = [dim] + [hidden] * n_mlp + [dim]
        self.slopes = nn.ParameterList()
        self.directions = nn.ParameterList()
        self.magnitudes = nn.ParameterList()
        self.biases = nn.ParameterList()
        lead = (pairs, n_res, NETWORKS)
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            bound = 1 / math.sqrt(w_in) if init == "torch" else math.sqrt(2.81 * 3 / w_in)
            direction = torch.empty(*lead, w_out, w_in).uniform_(-bound, bound)
            bias = torch.empty(*lead, 1, w_out)
            bias = bias.uniform_(-bound, bound) if init == "torch" else bias.zero_()
            self.slopes.append(nn.Parameter(torch.ones(*lead, 1, w_in)))
            self.directions.append(nn.Parameter(direction))
            self.magnitudes.append(nn.Parameter(direction.norm(dim=-1, keepdim=True)))
            self.biases.append(nn.Parameter(bias))
        self.s_scale = nn.Parameter(torch.zeros(pairs, dim))
        self.t_scale = nn.Parameter(torch.zeros(pairs, dim))

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, dim={self.dim}, n_res={self.n_res}, n_mlp={self.n_mlp}"

    def prepared(self, device: torch.device, fused: bool = False, order: torch.Tensor | None = None) -> "PreparedNetworks":
        """The per-pass tensors of :meth:`run` (see :class:`PreparedNetworks`).

        The weight norm runs once per stacked tensor (``torch._weight_norm`` over the input
        dimension of each output row, as ``nn.utils.weight_norm(nn.Linear)`` does). Under
        autocast the results are cast to the autocast dtype here, once per pass, so the
        GEMMs do not cast them per call (with ``fused`` only the weights). With ``fused`` the tensors come as one
        :class:`~rgkern.kernels.coupling_half_step.HalfStepWeights` per pair, the layout of
        the fused half-step kernels (``backend="triton"``). Without, ``order`` (the
        geometry's :meth:`~rgkern.core.geometry.Geometry.checkerboard_order`, required)
        permutes every ``D``-wide axis (the first linear's inputs and slopes, the last
        linear's outputs and biases) into the order of the rows :meth:`run` reads, and the
        coupling's ``s`` and ``t`` scales are folded into the weight-norm magnitudes and biases
        of each pair's last linear (``scale * (a @ W + B) = a @ (scale * W) + scale * B``), so
        that :meth:`run` returns ``s`` and ``t`` scaled, with no element-wise pass of its own.
        """
        if not fused and order is None:
            raise InputError("prepared() without fused needs the checkerboard order of the rows (Geometry.checkerboard_order)")
        cast = _autocast_dtype(device)
        weights, biases, slopes = [], [], []
        last = len(self.directions) - 1
        if not fused:
            # (P, 2, D): the coupling's s and t scales, folded into the outputs of each pair's
            # last linear (see run), so that s_raw and t_raw come out scaled.
            scales = torch.stack((self.s_scale, self.t_scale), dim=1)
            out_scales = scales[:, None, :, :, None] * SQRT_HALF
            if self.n_res > 1:  # the other blocks' last linears only carry the residual's 1/sqrt(2)
                out_scales = torch.cat((out_scales.new_full((self.pairs, self.n_res - 1, NETWORKS, self.dim, 1), SQRT_HALF), out_scales), dim=1)
        for j, (v, g, b, slope) in enumerate(zip(self.directions, self.magnitudes, self.biases, self.slopes)):
            w_out, w_in = v.shape[-2:]
            if j == last:
                # The residual's 1/sqrt(2) is folded into the last linear of each block (see run).
                if fused:
                    g, b = g * SQRT_HALF, b * SQRT_HALF
                else:
                    g, b = g * out_scales, b * out_scales.transpose(-1, -2)
            w = torch._weight_norm(v.reshape(-1, w_in), g.reshape(-1, 1), 0)
            if cast is not None:
                # The fused kernels read biases and slopes in float32 anyway: only their
                # tl.dot operands, the weights, are cast.
                w = w.to(cast)
                if not fused:
                    b, slope = b.to(cast), slope.to(cast)
            if fused:
                lead = (self.pairs, self.n_res, NETWORKS)
                weights.append(w.view(*lead, w_out, w_in))
                biases.append(b.view(*lead, w_out))
                slopes.append(slope.view(*lead, w_in))
                continue
            w, b, slope = w.view(-1, NETWORKS, w_out, w_in), b.view(-1, NETWORKS, 1, w_out), slope.view(-1, NETWORKS, 1, w_in)
            if j == 0:
                w, slope = w.index_select(-1, order), slope.index_select(-1, order)
            if j == last:
                w, b = w.index_select(-2, order), b.index_select(-1, order)
            # One unbind per tensor: its backward is one stack, where indexing per half-step
            # would give one full-size select_backward per use.
            weights.append(w.transpose(-1, -2).unbind(0))
            biases.append(b.unbind(0))
            slopes.append(slope.unbind(0))
        if fused:
            stacked = self._stacked(weights, biases, slopes)
            return PreparedNetworks(None, None, None, self.s_scale.unbind(0), self.t_scale.unbind(0), cast,
                                    self._half_steps(stacked), stacked)
        residual_scales = None
        if self.n_res > 1:  # the last block's residual, scaled like its linear
            residual_scales = (scales * SQRT_HALF).index_select(-1, order).unsqueeze(-2)
            residual_scales = (residual_scales if cast is None else residual_scales.to(cast)).unbind(0)
        return PreparedNetworks(weights, biases, slopes, None, None, cast, residual_scales=residual_scales)

    def _stacked(self, weights, biases, slopes):
        """One :class:`HalfStepWeights` of all pairs, each tensor with a leading pair dimension
        (:func:`rgkern.kernels.coupling_half_step.sublayer_couplings_forward`'s layout)."""
        from ..kernels.coupling_half_step import HalfStepWeights

        def kinds(tensors):
            """(first, mid, last): the mid linears stacked on a new dimension after the pair."""
            if len(tensors) == 1:
                return None, None, tensors[0]
            mids = tensors[1:-1]
            mid = None if not mids else torch.stack(mids, 1) if len(mids) > 1 else mids[0].unsqueeze(1)
            return tensors[0], mid, tensors[-1]

        (w_first, w_mid, w_last), (b_first, b_mid, b_last), (s_first, s_mid, s_last) = (
            kinds(weights), kinds(biases), kinds(slopes)
        )
        return HalfStepWeights(w_first, b_first, s_first, w_mid, b_mid, s_mid, w_last, b_last, s_last)

    def _half_steps(self, stacked) -> tuple:
        """Per pair, the :class:`HalfStepWeights` of its slices of the ``stacked`` tensors (one
        unbind per tensor: its backward is one stack, where indexing per pair would give one
        full-size select_backward per use)."""
        from ..kernels.coupling_half_step import HalfStepWeights

        per_tensor = [(None,) * self.pairs if t is None else t.unbind(0) for t in stacked]
        return tuple(HalfStepWeights(*(tensors[p] for tensors in per_tensor)) for p in range(self.pairs))

    def run(self, conditioner: torch.Tensor, pair: int, prepared: "PreparedNetworks", flipped: bool) -> torch.Tensor:
        """``s_raw`` and ``t_raw`` stacked ``(2, N, D/2)`` of half-step ``pair``, times their
        scales (``s_scale``, ``t_scale``), on the half it updates.

        The rows are in the checkerboard order of :meth:`prepared`: the conditioning half
        (``conditioner`` ``(N, D/2)``) is the first ``D/2`` entries, or the last with
        ``flipped``, and the updated half the others. The networks' input is the masked row,
        zero outside the conditioning half, so the first linear reads only those inputs; the
        coupling needs ``s`` and ``t`` only on the updated half, so the last linear computes
        only those outputs.
        """
        half = self.dim // 2
        cond_cols, out_cols = (slice(half, None), slice(0, half)) if flipped else (slice(0, half), slice(half, None))
        # Under autocast the networks run in its dtype from the start (one cast per
        # half-step, rather than one per GEMM input of the first block).
        x = conditioner if prepared.dtype is None else conditioner.to(prepared.dtype)
        last = len(prepared.weights) - 1
        first_block, last_block = pair * self.n_res, (pair + 1) * self.n_res - 1
        for i in range(first_block, last_block + 1):
            h = x
            for j, (w, b, slope) in enumerate(zip(prepared.weights, prepared.biases, prepared.slopes)):
                w, b, slope = w[i], b[i], slope[i]
                if i == first_block and j == 0:
                    w, slope = w[:, cond_cols], slope[..., cond_cols]
                if i == last_block and j == last:
                    w, b = w[..., out_cols], b[..., out_cols]
                a = h * torch.sigmoid(slope * h)
                if j < last:
                    h = torch.baddbmm(b, a, w)
                    continue
                # (x + a @ W + B) / sqrt(2) = (b + x / sqrt(2)) + a @ w with the block's
                # last w = W / sqrt(2) and b = B / sqrt(2) from prepared() (on the last block
                # also times the s and t scales, and so its residual). The first block's x is
                # the conditioning half alone: zero on the updated half.
                if i == first_block and i == last_block:
                    base = b
                elif i == first_block:
                    base = torch.add(b, F.pad(x, (half, 0) if flipped else (0, half)), alpha=SQRT_HALF)
                elif i == last_block:
                    base = torch.addcmul(b, x[..., out_cols], prepared.residual_scales[pair][..., out_cols])
                else:
                    base = torch.add(b, x, alpha=SQRT_HALF)
                x = torch.baddbmm(base, a, w)
        return x


class PreparedNetworks(NamedTuple):
    """Per-pass tensors of :class:`CouplingNetworks` (:meth:`CouplingNetworks.prepared`).

    ``dtype``: the autocast dtype the tensors were cast to, or None. The torch path
    (``fused=False``): ``weights[j][i]`` ``(2, w_in, w_out)`` weight-normalised, ``biases[j][i]``
    ``(2, 1, w_out)``, ``slopes[j][i]`` ``(2, 1, w_in)``, indexed by linear ``j`` and ``i =
    pair * n_res + block``, every ``D``-wide axis in the checkerboard order, the last linears
    carrying the residual's 1/sqrt(2) and, on each pair's last block, the coupling's s and t
    scales; ``residual_scales[pair]`` ``(2, 1, D)``: those scales times 1/sqrt(2), for the last
    block's residual (None with one block). The fused path (row order, the last linears
    carrying 1/sqrt(2)): ``half_steps[pair]`` holds the pair's
    :class:`~rgkern.kernels.coupling_half_step.HalfStepWeights`, ``stacked`` one of all pairs
    (a leading pair dimension; :meth:`Sublayer.forward_fused`) and ``s_scales[pair]``,
    ``t_scales[pair]`` ``(D,)`` the scales. Fields of the other path are None.
    """

    weights: list | None
    biases: list | None
    slopes: list | None
    s_scales: tuple | None
    t_scales: tuple | None
    dtype: torch.dtype | None
    half_steps: tuple | None = None
    stacked: object = None
    residual_scales: tuple | None = None


class Sublayer(nn.Module):
    """A disentangler or decimator: a stack of RNVP blocks applied to every patch of a sublayer.

    An RNVP block is two coupling half-steps with the checkerboard mask and its complement:
    half-step ``step = 2 * block + flipped`` (``flipped`` 0 or 1). With
    ``networks_per_block = 2`` (variant "paper") it uses pair ``step`` of :attr:`networks`;
    with 1 (variant "authors") both half-steps of a block use pair ``block``. All ``B*P``
    patches share the weights. ``forward(x)`` returns the new
    image and the per-sample log-det ``(B,)`` of this sublayer (float64 for float64 input,
    else float32).
    """

    def __init__(self, geometry: Geometry, index: int, n_layers: int, hidden: int, n_res: int, n_mlp: int,
                 networks_per_block: int = 2, init: str = "torch"):
        super().__init__()
        if networks_per_block not in (1, 2):
            raise InputError(f"networks_per_block must be 1 or 2, got {networks_per_block!r}")
        self.geometry = geometry
        self.index = index
        self.num_blocks = n_layers
        self.networks_per_block = networks_per_block
        self.networks = CouplingNetworks(networks_per_block * n_layers, geometry.patch_dim, hidden, n_res, n_mlp, init)
        self.activation_checkpointing = False

    def extra_repr(self) -> str:
        return f"{self.geometry.sublayers[self.index].name}, blocks={self.num_blocks}"

    def prepared(self, device: torch.device, backend: str) -> PreparedNetworks:
        """This pass's :meth:`CouplingNetworks.prepared` for ``backend`` (``"torch"`` or ``"triton"``)."""
        if backend == "triton":
            return self.networks.prepared(device, fused=True)
        return self.networks.prepared(device, order=self.geometry.checkerboard_order(device))

    def coupling(self, rows, step: int, inverse: bool, backend: str, prepared=None):
        """Coupling half-step ``step`` (``2 * block + flipped``) on patch rows.

        ``rows`` in the layout of ``backend``: for ``"triton"`` a tensor ``(N, D)`` in row
        order (the fused kernel masks it); for ``"torch"`` the pair ``(first, second)`` of
        ``(N, D/2)`` halves of the rows in the geometry's checkerboard order
        (:meth:`transform_rows` converts), of which the half-step updates the second from the
        first (with ``flipped``, the first from the second). Returns the new rows in the same
        layout and the per-row log-det ``(N,)``. ``prepared``: this pass's :meth:`prepared`
        (computed here when None).
        """
        if prepared is None:
            prepared = self.prepared(self.networks.s_scale.device, backend)
        block, flipped = divmod(step, 2)
        pair = step if self.networks_per_block == 2 else block
        if prepared.half_steps is not None:
            mask = self.geometry.coupling_mask(rows.device, rows.dtype, flipped=bool(flipped))
            return ops.coupling_half_step(rows, mask, prepared.s_scales[pair], prepared.t_scales[pair],
                                          prepared.half_steps[pair], inverse, backend)
        first, second = rows
        conditioner, free = (second, first) if flipped else (first, second)
        raw = self.networks.run(conditioner, pair, prepared, bool(flipped))
        # Under autocast the coupling itself (tanh, exp, the update) stays in the rows' dtype.
        s_pre, t = (raw if raw.dtype == free.dtype else raw.to(free.dtype)).unbind(0)
        updated, logdet = reference.affine_update(free, s_pre, t, inverse)
        return ((updated, conditioner) if flipped else (conditioner, updated)), logdet

    def _block(self, rows, logdet, block: int, inverse: bool, backend: str, prepared):
        """The two half-steps of RNVP block ``block`` (in reverse for the inverse)."""
        for flipped in (1, 0) if inverse else (0, 1):
            rows, ld = self.coupling(rows, 2 * block + flipped, inverse, backend, prepared)
            logdet = logdet + ld
        return rows, logdet

    def _blocks(self, rows: torch.Tensor, inverse: bool, backend: str):
        """The block stack on rows ``(N, D)``: row order for ``"triton"``, checkerboard order for ``"torch"``."""
        prepared = self.prepared(rows.device, backend)
        logdet = rows.new_zeros(rows.shape[0], dtype=accumulator_dtype(rows.dtype))
        fused = prepared.half_steps is not None
        # The torch path carries the two halves apart (coupling), joined once at the end.
        state = rows if fused else rows.split(rows.shape[1] // 2, dim=1)
        blocks = range(self.num_blocks - 1, -1, -1) if inverse else range(self.num_blocks)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not inverse
        for block in blocks:
            if recompute:
                state, logdet = checkpoint(self._block, state, logdet, block, inverse, backend, prepared, use_reentrant=False)
            else:
                state, logdet = self._block(state, logdet, block, inverse, backend, prepared)
        return (state if fused else torch.cat(state, dim=1)), logdet

    def transform_rows(self, rows: torch.Tensor, inverse: bool, backend: str):
        """Run the block stack on patch rows ``(N, D)`` in row order; returns rows and per-row log-det ``(N,)``."""
        if backend == "triton":
            return self._blocks(rows, inverse, backend)
        rows, logdet = self._blocks(rows.index_select(1, self.geometry.checkerboard_order(rows.device)), inverse, backend)
        return rows.index_select(1, self.geometry.checkerboard_order(rows.device, inverse=True)), logdet

    def forward(self, x: torch.Tensor, inverse: bool = False, backend: str = "torch"):
        if backend == "triton" and self.num_blocks > 0:
            return self.forward_fused(x, inverse)
        # The torch path gathers the rows straight into its checkerboard order.
        index = self.geometry.row_index if backend == "triton" else self.geometry.checkerboard_row_index
        row_index = index(self.index, x.device)
        rows = ops.gather_patches(x, row_index, backend)
        rows, logdet = self._blocks(rows, inverse, backend)
        return ops.scatter_patches(x, rows, row_index, backend), logdet.view(x.shape[0], -1).sum(dim=1)

    def forward_fused(self, x: torch.Tensor, inverse: bool = False):
        """:meth:`forward` with the Triton kernels on whole images: ``2 * n_layers`` launches,
        the first half-step gathering the patches, the last scattering them back (pixels no
        patch covers come through), the log-det summed in the kernels
        (:func:`rgkern.core.ops.sublayer_couplings`). With activation checkpointing the
        backward recomputes each half-step's activations instead of keeping them."""
        geometry, networks = self.geometry, self.networks
        prepared = networks.prepared(x.device, fused=True)
        masks = [geometry.coupling_mask(x.device, x.dtype, flipped=flipped) for flipped in (False, True)]
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not inverse
        return ops.sublayer_couplings(x, geometry.row_index(self.index, x.device), *masks, networks.s_scale,
                                      networks.t_scale, prepared.stacked, self.networks_per_block == 1, inverse,
                                      recompute, backend="triton")


def _per_level(name: str, value, num_levels: int) -> tuple[int, ...]:
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
        activation_checkpointing: bool = False,
        variant: str = "paper",
        init: str | None = None,
    ):
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
    def check_images(self, x, name: str, check_finite: bool):
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
    def encode(self, x: torch.Tensor):
        """``x (B, C, L, L) -> (z (B, C, L, L), logdet (B,))`` with ``logdet = log|det dz/dx|``."""
        self.check_images(x, "x", check_finite=True)
        backend = ops.resolve_backend(self.backend, x)
        logdet = None
        for sublayer in self.sublayers:
            x, ld = sublayer(x, inverse=False, backend=backend)
            logdet = ld if logdet is None else logdet + ld
        return x, logdet

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`encode`: ``z (B, C, L, L) -> x (B, C, L, L)``."""
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

    def temperature_map(self, temperature, device=None, dtype=torch.float32) -> torch.Tensor:
        """Per-latent temperature ``(C, L, L)`` from a float or one temperature per level (len H).

        Each temperature is a real number in ``[0, MAX_TEMPERATURE]``; strings are refused
        (``TypeError``), a wrong number of levels or a value out of range is a ``ValueError``.
        """
        H = self.num_levels
        expected = f"temperature must be a float or a sequence of {H} floats (one per RG level), got {temperature!r}"

        def number(t):
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

    def sample_latents(self, n: int, temperature=1.0, generator=None, device=None, dtype=None) -> torch.Tensor:
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

    def sample(self, n: int, temperature=1.0, generator=None, batch_size: int | None = None) -> torch.Tensor:
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


# --------------------------------------------------------------------------- legacy checkpoints
def _legacy_key(sublayer: int, pair: int, name: str) -> str:
    block, half = divmod(pair, 2)
    return f"sublayers.{sublayer}.blocks.{block}.halves.{half}.{name}"


def is_legacy_state_dict(state: dict) -> bool:
    """True for a state dict of the first layout (one ``nn.Linear`` per layer, ``blocks.B.halves.H``)."""
    return any(".halves." in key for key in state)


def convert_legacy_state_dict(state: dict, model: RGFlow) -> dict:
    """Map a state dict of the first layout (checkpoint format 1) onto ``model``'s stacked layout.

    The first layout had, per half-step ``h`` of block ``b`` of sublayer ``s``,
    ``sublayers.s.blocks.b.halves.h.{s_net,t_net}.blocks.r.{2j}.beta`` (Swish slopes),
    ``....{2j+1}.parametrizations.weight.original0`` / ``original1`` (weight-norm ``g`` /
    ``v``), ``....{2j+1}.bias`` and ``...halves.h.{s_scale,t_scale}``. Half-step ``h`` of
    block ``b`` is pair ``2b + h`` here. Raises ``KeyError`` naming a missing tensor.
    """
    out = {}
    for s, sublayer in enumerate(model.sublayers):
        nets = sublayer.networks
        prefix = f"sublayers.{s}.networks"
        for j in range(nets.n_mlp + 1):
            parts = {
                "slopes": (f"{2 * j}.beta", lambda t: t.reshape(1, -1)),
                "directions": (f"{2 * j + 1}.parametrizations.weight.original1", lambda t: t),
                "magnitudes": (f"{2 * j + 1}.parametrizations.weight.original0", lambda t: t.reshape(-1, 1)),
                "biases": (f"{2 * j + 1}.bias", lambda t: t.reshape(1, -1)),
            }
            for name, (suffix, shape) in parts.items():
                target = getattr(nets, name)[j]
                stacked = torch.empty(target.shape, dtype=target.dtype)
                for pair in range(nets.pairs):
                    for r in range(nets.n_res):
                        for n, network in enumerate(("s_net", "t_net")):
                            key = _legacy_key(s, pair, f"{network}.blocks.{r}.{suffix}")
                            stacked[pair, r, n] = shape(state[key])
                out[f"{prefix}.{name}.{j}"] = stacked
        for scale in ("s_scale", "t_scale"):
            out[f"{prefix}.{scale}"] = torch.stack(
                [state[_legacy_key(s, pair, scale)] for pair in range(nets.pairs)]
            )
    return out
