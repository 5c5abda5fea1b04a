"""A sublayer of the RG-Flow model (a disentangler or a decimator): RNVP blocks on every patch.

The blocks' ``s`` and ``t`` networks are one :class:`~rgkern.core.networks.CouplingNetworks`
per sublayer (the stacked parameter layout of :mod:`rgkern.core.networks`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops, reference
from .errors import InputError
from .geometry import Geometry
from .networks import CouplingNetworks, PreparedFusedNetworks, PreparedTorchNetworks
from .precision import accumulator_dtype

__all__ = ["Sublayer", "Rows", "Prepared"]

#: Patch rows as a half-step reads them: ``(N, D)`` in row order for ``"triton"``, the two
#: ``(N, D/2)`` halves in the checkerboard order for ``"torch"`` (:meth:`Sublayer.coupling`).
Rows = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
#: A pass's prepared networks, of the path of its backend (:meth:`Sublayer.prepared`).
Prepared = PreparedTorchNetworks | PreparedFusedNetworks


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
                 networks_per_block: int = 2, init: str = "torch") -> None:
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

    def prepared(self, device: torch.device, backend: str) -> Prepared:
        """This pass's networks for ``backend``: :meth:`CouplingNetworks.prepared_fused` for
        ``"triton"``, :meth:`CouplingNetworks.prepared_torch` in the geometry's checkerboard
        order for ``"torch"``."""
        if backend == "triton":
            return self.networks.prepared_fused(device)
        return self.networks.prepared_torch(device, self.geometry.checkerboard_order(device))

    def coupling(self, rows: Rows, step: int, inverse: bool, backend: str,
                 prepared: Prepared | None = None) -> tuple[Rows, torch.Tensor]:
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
        if isinstance(prepared, PreparedFusedNetworks):
            mask = self.geometry.coupling_mask(rows.device, rows.dtype, flipped=bool(flipped))
            return ops.coupling_half_step(rows, mask, prepared.s_scales[pair], prepared.t_scales[pair],
                                          prepared.half_steps[pair], inverse, backend, compute_dtype=prepared.dtype)
        first, second = rows
        conditioner, free = (second, first) if flipped else (first, second)
        raw = self.networks.run(conditioner, pair, prepared, bool(flipped))
        # Under autocast the coupling itself (tanh, exp, the update) stays in the rows' dtype.
        s_pre, t = (raw if raw.dtype == free.dtype else raw.to(free.dtype)).unbind(0)
        updated, logdet = reference.affine_update(free, s_pre, t, inverse)
        return ((updated, conditioner) if flipped else (conditioner, updated)), logdet

    def _block(self, rows: Rows, logdet: torch.Tensor, block: int, inverse: bool, backend: str,
               prepared: Prepared) -> tuple[Rows, torch.Tensor]:
        """The two half-steps of RNVP block ``block`` (in reverse for the inverse)."""
        for flipped in (1, 0) if inverse else (0, 1):
            rows, ld = self.coupling(rows, 2 * block + flipped, inverse, backend, prepared)
            logdet = logdet + ld
        return rows, logdet

    def _blocks(self, rows: torch.Tensor, inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The block stack on rows ``(N, D)``: row order for ``"triton"``, checkerboard order for ``"torch"``."""
        logdet = rows.new_zeros(rows.shape[0], dtype=accumulator_dtype(rows.dtype))
        if self.num_blocks == 0:  # the identity (its networks hold no weights to prepare)
            return rows, logdet
        prepared = self.prepared(rows.device, backend)
        fused = isinstance(prepared, PreparedFusedNetworks)
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

    def transform_rows(self, rows: torch.Tensor, inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the block stack on patch rows ``(N, D)`` in row order; returns rows and per-row log-det ``(N,)``."""
        if backend == "triton":
            return self._blocks(rows, inverse, backend)
        rows, logdet = self._blocks(rows.index_select(1, self.geometry.checkerboard_order(rows.device)), inverse, backend)
        return rows.index_select(1, self.geometry.checkerboard_order(rows.device, inverse=True)), logdet

    def forward(self, x: torch.Tensor, inverse: bool = False, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """The sublayer on images ``x`` ``(B, C, L, L)``: the new images and the log-det ``(B,)``
        (its inverse with ``inverse``; ``backend`` ``"torch"`` or ``"triton"``)."""
        if self.num_blocks == 0:  # a sublayer of no blocks is the identity
            return x, x.new_zeros(x.shape[0], dtype=accumulator_dtype(x.dtype))
        if backend == "triton":
            return self.forward_fused(x, inverse)
        # The torch path gathers the rows straight into its checkerboard order.
        index = self.geometry.row_index if backend == "triton" else self.geometry.checkerboard_row_index
        row_index = index(self.index, x.device)
        rows = ops.gather_patches(x, row_index, backend)
        rows, logdet = self._blocks(rows, inverse, backend)
        return ops.scatter_patches(x, rows, row_index, backend), logdet.view(x.shape[0], -1).sum(dim=1)

    def forward_fused(self, x: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the Triton kernels on whole images: ``2 * n_layers`` launches,
        the first half-step gathering the patches, the last scattering them back (pixels no
        patch covers come through), the log-det summed in the kernels
        (:func:`rgkern.core.ops.sublayer_couplings`). With activation checkpointing the
        backward recomputes each half-step's activations instead of keeping them."""
        geometry, networks = self.geometry, self.networks
        prepared = networks.prepared_fused(x.device)
        masks = [geometry.coupling_mask(x.device, x.dtype, flipped=flipped) for flipped in (False, True)]
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not inverse
        return ops.sublayer_couplings(x, geometry.row_index(self.index, x.device), *masks, networks.s_scale,
                                      networks.t_scale, prepared.stacked, self.networks_per_block == 1, inverse,
                                      recompute, backend="triton", compute_dtype=prepared.dtype)
