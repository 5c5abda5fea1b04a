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
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError

__all__ = ["CouplingNetworks", "PreparedNetworks", "INITS", "SQRT_HALF", "NETWORKS"]

SQRT_HALF = 1 / math.sqrt(2)
NETWORKS = 2  # s and t

#: Initialisations of the linears. "torch": PyTorch's nn.Linear default, weights and biases
#: uniform in +-1/sqrt(fan_in). "authors": the authors' code, weights uniform in
#: +-sqrt(2.81 * 3 / fan_in) (2.81: their gain for Swish) and zero biases. In both the
#: weight-norm magnitude starts at ||v||, Swish slopes at 1 and the output scales at 0.
INITS = ("torch", "authors")


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
        :class:`~rgkern.kernels.coupling.HalfStepWeights` per pair, the layout of
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
        (:func:`rgkern.kernels.coupling.sublayer_couplings_forward`'s layout)."""
        from ..kernels.coupling import HalfStepWeights

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
        from ..kernels.coupling import HalfStepWeights

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
    :class:`~rgkern.kernels.coupling.HalfStepWeights`, ``stacked`` one of all pairs
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
