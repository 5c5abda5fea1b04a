"""The ``s`` and ``t`` networks of a sublayer's coupling half-steps, stacked, and their per-pass tensors.

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

Those per-pass tensors differ by path: :meth:`CouplingNetworks.prepared_torch` gives a
:class:`PreparedTorchNetworks` (checkerboard order, for :meth:`CouplingNetworks.run`),
:meth:`CouplingNetworks.prepared_fused` a :class:`PreparedFusedNetworks` (row order, the
layout of the fused half-step kernels).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError

__all__ = ["CouplingNetworks", "PreparedTorchNetworks", "PreparedFusedNetworks", "INITS", "SQRT_HALF", "NETWORKS"]

SQRT_HALF = 1 / math.sqrt(2)
NETWORKS = 2  # s and t

#: Initialisations of the linears. "torch": PyTorch's nn.Linear default, weights and biases
#: uniform in +-1/sqrt(fan_in). "authors": the authors' code, weights uniform in
#: +-sqrt(2.81 * 3 / fan_in) (2.81: their gain for Swish) and zero biases. In both the
#: weight-norm magnitude starts at ||v||, Swish slopes at 1 and the output scales at 0.
INITS = ("torch", "authors")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class PreparedTorchNetworks(NamedTuple):
    """This pass's tensors of the torch path (:meth:`CouplingNetworks.prepared_torch`), read by
    :meth:`CouplingNetworks.run`.

    Indexed by linear ``j = 0 .. n_mlp`` and ``i = pair * n_res + block``, weight-normalised,
    every ``D``-wide axis in the geometry's checkerboard order, network 0 ``s`` and 1 ``t``:

    * ``weights[j][i]`` ``(2, w_in, w_out)`` (transposed, for ``a @ w``);
    * ``biases[j][i]`` ``(2, 1, w_out)``;
    * ``slopes[j][i]`` ``(2, 1, w_in)``;
    * ``residual_scales[pair]`` ``(2, 1, D)``: the coupling's ``s`` and ``t`` scales times
      1/sqrt(2), for the residual of the pair's last block; None with one block per pair;
    * ``dtype``: the autocast dtype all of them were cast to, or None.

    The last linear of every block carries the residual's 1/sqrt(2); that of each pair's last
    block also the coupling's ``s`` and ``t`` scales.
    """

    weights: tuple[tuple[torch.Tensor, ...], ...]
    biases: tuple[tuple[torch.Tensor, ...], ...]
    slopes: tuple[tuple[torch.Tensor, ...], ...]
    residual_scales: tuple[torch.Tensor, ...] | None
    dtype: torch.dtype | None


class PreparedFusedNetworks(NamedTuple):
    """This pass's tensors of the fused path (:meth:`CouplingNetworks.prepared_fused`), the
    layout of the fused half-step kernels (``backend="triton"``).

    In row order (not permuted), the last linear of every block carrying the residual's
    1/sqrt(2); ``P`` pairs, ``R = n_res``, network 0 ``s`` and 1 ``t``:

    * ``stacked``: one :class:`~rgkern.kernels.coupling.HalfStepWeights` of all pairs
      (:meth:`~rgkern.core.sublayer.Sublayer.forward_fused`): weights ``(P, R, 2, w_out, w_in)``,
      biases ``(P, R, 2, w_out)``, slopes ``(P, R, 2, w_in)``; the ``n_mlp - 1`` mid linears
      stacked after the pair dimension (``w_mid`` ``(P, n_mlp - 1, R, 2, hidden, hidden)``), the
      first and mid entries None where ``n_mlp`` leaves none;
    * ``half_steps[pair]``: the pair's :class:`~rgkern.kernels.coupling.HalfStepWeights`, its
      slices of ``stacked`` (:meth:`~rgkern.core.sublayer.Sublayer.coupling` on rows);
    * ``s_scales[pair]``, ``t_scales[pair]`` ``(D,)``: the coupling's scales;
    * ``dtype``: the autocast dtype the kernels compute in (they cast the weights as they load them),
      or None.
    """

    stacked: tuple  # a HalfStepWeights (imported only when the kernels run: they import Triton)
    half_steps: tuple[tuple, ...]  # one HalfStepWeights per pair
    s_scales: tuple[torch.Tensor, ...]
    t_scales: tuple[torch.Tensor, ...]
    dtype: torch.dtype | None


def _by_kind(tensors: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(first, mid, last) of the per-linear ``tensors``: the mid linears stacked on a new
    dimension after the pair (the layout of :class:`~rgkern.kernels.coupling.HalfStepWeights`)."""
    if len(tensors) == 1:
        return None, None, tensors[0]
    mids = tensors[1:-1]
    mid = None if not mids else torch.stack(mids, 1) if len(mids) > 1 else mids[0].unsqueeze(1)
    return tensors[0], mid, tensors[-1]


class CouplingNetworks(nn.Module):
    """The ``s`` and ``t`` residual MLPs of ``pairs`` coupling half-steps, stacked (see the module docstring).

    ``n_res`` residual blocks ``x <- (x + f(x)) / sqrt(2)``; ``f`` is [Swish
    ``x * sigmoid(slope * x)`` with a learned per-feature slope, then a weight-normalised
    Linear] repeated ``n_mlp + 1`` times with widths ``dim, hidden, ..., hidden, dim``.
    ``init`` is one of :data:`INITS`; with either, ``g = ||v||``, slopes start at 1 and the
    output scales at 0, so every half-step starts as the identity.
    """

    def __init__(self, pairs: int, dim: int, hidden: int, n_res: int, n_mlp: int, init: str = "torch") -> None:
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

    def prepared_torch(self, device: torch.device, checkerboard_order: torch.Tensor) -> PreparedTorchNetworks:
        """This pass's tensors for :meth:`run` (the torch path; see :class:`PreparedTorchNetworks`).

        The weight norm runs once per stacked tensor (``torch._weight_norm`` over the input
        dimension of each output row, as ``nn.utils.weight_norm(nn.Linear)`` does). Under
        autocast on ``device`` the weights, biases and slopes are cast to the autocast dtype
        here, once per pass, so the GEMMs do not cast them per call. ``checkerboard_order``
        (``(D,)``, the geometry's :meth:`~rgkern.core.geometry.Geometry.checkerboard_order`)
        permutes every ``D``-wide axis (the first linear's inputs and slopes, the last
        linear's outputs and biases) into the order of the rows :meth:`run` reads, and the
        coupling's ``s`` and ``t`` scales are folded into the weight-norm magnitudes and biases
        of each pair's last linear (``scale * (a @ W + B) = a @ (scale * W) + scale * B``), so
        that :meth:`run` returns ``s`` and ``t`` scaled, with no element-wise pass of its own.
        """
        cast = _autocast_dtype(device)
        weights, biases, slopes = [], [], []
        last = len(self.directions) - 1
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
                g, b = g * out_scales, b * out_scales.transpose(-1, -2)
            w = torch._weight_norm(v.reshape(-1, w_in), g.reshape(-1, 1), 0)
            if cast is not None:
                w, b, slope = w.to(cast), b.to(cast), slope.to(cast)
            w, b, slope = w.view(-1, NETWORKS, w_out, w_in), b.view(-1, NETWORKS, 1, w_out), slope.view(-1, NETWORKS, 1, w_in)
            if j == 0:
                w, slope = w.index_select(-1, checkerboard_order), slope.index_select(-1, checkerboard_order)
            if j == last:
                w, b = w.index_select(-2, checkerboard_order), b.index_select(-1, checkerboard_order)
            # One unbind per tensor: its backward is one stack, where indexing per half-step
            # would give one full-size select_backward per use.
            weights.append(w.transpose(-1, -2).unbind(0))
            biases.append(b.unbind(0))
            slopes.append(slope.unbind(0))
        residual_scales = None
        if self.n_res > 1:  # the last block's residual, scaled like its linear
            residual_scales = (scales * SQRT_HALF).index_select(-1, checkerboard_order).unsqueeze(-2)
            residual_scales = (residual_scales if cast is None else residual_scales.to(cast)).unbind(0)
        return PreparedTorchNetworks(tuple(weights), tuple(biases), tuple(slopes), residual_scales, cast)

    def prepared_fused(self, device: torch.device) -> PreparedFusedNetworks:
        """This pass's tensors for the fused half-step kernels (``backend="triton"``; see
        :class:`PreparedFusedNetworks`), in row order.

        The weight norm runs once per stacked tensor, as in :meth:`prepared_torch`, and the
        residual's 1/sqrt(2) is folded into each block's last linear. Nothing is cast: under
        autocast on ``device`` the kernels compute in the autocast dtype (``dtype``), casting the
        weights as they load them, so a pass adds no cast kernels.
        """
        from ..kernels.coupling import HalfStepWeights  # the one import of the kernels (lazy: they import Triton)

        cast = _autocast_dtype(device)
        lead = (self.pairs, self.n_res, NETWORKS)
        weights, biases, slopes = [], [], []
        last = len(self.directions) - 1
        for j, (v, g, b, slope) in enumerate(zip(self.directions, self.magnitudes, self.biases, self.slopes)):
            w_out, w_in = v.shape[-2:]
            if j == last:
                g, b = g * SQRT_HALF, b * SQRT_HALF
            w = torch._weight_norm(v.reshape(-1, w_in), g.reshape(-1, 1), 0)
            weights.append(w.view(*lead, w_out, w_in))
            biases.append(b.view(*lead, w_out))
            slopes.append(slope.view(*lead, w_in))
        (w_first, w_mid, w_last), (b_first, b_mid, b_last), (s_first, s_mid, s_last) = (
            _by_kind(weights), _by_kind(biases), _by_kind(slopes)
        )
        stacked = HalfStepWeights(w_first, b_first, s_first, w_mid, b_mid, s_mid, w_last, b_last, s_last)
        # Per pair, its slices of the stacked tensors: one unbind per tensor (its backward is
        # one stack, where indexing per pair would give one full-size select_backward per use).
        per_tensor = [(None,) * self.pairs if t is None else t.unbind(0) for t in stacked]
        half_steps = tuple(HalfStepWeights(*(tensors[p] for tensors in per_tensor)) for p in range(self.pairs))
        return PreparedFusedNetworks(stacked, half_steps, self.s_scale.unbind(0), self.t_scale.unbind(0), cast)

    def run(self, conditioner: torch.Tensor, pair: int, prepared: PreparedTorchNetworks, flipped: bool) -> torch.Tensor:
        """``s_raw`` and ``t_raw`` stacked ``(2, N, D/2)`` of half-step ``pair``, times their
        scales (``s_scale``, ``t_scale``), on the half it updates.

        The rows are in the checkerboard order of :meth:`prepared_torch`: the conditioning half
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
                # last w = W / sqrt(2) and b = B / sqrt(2) from prepared_torch() (on the last
                # block also times the s and t scales, and so its residual). The first block's
                # x is the conditioning half alone: zero on the updated half.
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
