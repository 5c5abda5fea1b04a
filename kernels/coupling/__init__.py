"""One coupling half-step fused: the s and t residual MLPs, the affine coupling and its log-det.

A half-step on patch rows ``x`` ``(N, D)`` with the checkerboard ``mask`` ``m`` (1 on the
conditioning half)::

    r_0 = x * m                                     (the same for both networks)
    r_{i+1} = r_i / sqrt(2) + f_i(r_i)              for the n_res residual blocks i
    f_i = linear_last . swish . ... . linear_first . swish      (n_mlp + 1 linears)
    s_raw, t_raw = r_{n_res} of network 0 (s) and network 1 (t)
    y, logdet = affine_coupling(x, s_raw, t_raw, ...)           (rgkern.kernels.affine_coupling)

``swish(u) = u * sigmoid(slope * u)`` with a learned per-feature slope before every linear;
the linears are weight-normalised by the caller, and the last one of each block carries the
residual's 1/sqrt(2) in its weight and bias (``rgkern.core.networks.CouplingNetworks.prepared_fused``).
Weights are in ``nn.Linear`` layout ``(w_out, w_in)`` and stacked per half-step as
``[residual block, network]``:

* ``w_first (R, 2, H, D)``, ``b_first (R, 2, H)``, ``slope_first (R, 2, D)``;
* ``w_mid (M, R, 2, H, H)``, ``b_mid (M, R, 2, H)``, ``slope_mid (M, R, 2, H)``: the
  ``M = n_mlp - 1`` hidden-to-hidden linears (absent for n_mlp < 2);
* ``w_last (R, 2, D, W)``, ``b_last (R, 2, D)``, ``slope_last (R, 2, W)`` with ``W = H``,
  or ``W = D`` when n_mlp = 0 (then the block is this one linear and "first"/"mid" are absent).

Kernels (one program = a block of ``BLOCK_ROWS`` rows, or a weight tile for the weight
gradients):

* :func:`coupling_half_step_fwd_kernel`: every linear of both networks and the coupling, for
  its rows, in one launch. Each linear is a ``tl.dot`` loop with the Swish in the prologue and
  bias (and residual) in the epilogue; its output goes to a row-block of a global activation
  buffer, re-read in tiles by the next linear after a CTA barrier (a row-block's activations
  are only ever touched by its own program). With ``save`` the buffers keep every block's
  activations for the backward pass; without, two slots are reused in turn.
* :func:`coupling_half_step_bwd_kernel`: the coupling's backward, then the input gradients of
  every linear in reverse (Swish derivative and residual fused), for its rows; writes the
  gradient of every linear's output (for the weight gradients), the row gradient, and per
  program partial sums of the slope and scale gradients.
* :func:`coupling_weight_grad_kernel`: ``dW = g^T @ swish(u)`` and ``db = sum g`` of one kind
  of linear for all its matrices; each program owns a weight tile and loops over all rows,
  so the reduction is deterministic (no atomics). ``ACCUMULATE`` adds to the buffers.

Host functions: :func:`coupling_half_step_forward` / ``_backward`` run one half-step on rows
(``transform_rows``: the incremental encoder and decoder, inpainting). A whole sublayer on
whole images is :func:`sublayer_couplings_forward` / ``_backward``: its ``2 * blocks``
half-steps, the weights of all its pairs of networks stacked on a leading dimension. There the
first launch reads its rows straight from the images through the sublayer's patch table
(``GATHER``) and copies the images to the output (``COPY``, where some pixels are in no patch:
they come through unchanged), the last writes its rows into the output (``SCATTER``), the
log-det accumulates per row in the kernels (``ACCUMULATE``), the backward mirrors it (the
gradient of the uncovered pixels passes through; the per-image log-det gradient is read
where it lies, an expanded one too), and the weight gradients go straight into stacked
buffers, a pair shared by two half-steps ("authors") accumulating. No gather, scatter, copy
or log-det add outside the kernels.

Tiles: :data:`TUNING_CONFIGS` per compute dtype; on a CUDA device :func:`choose_tiles` times
them once per kernel and shape on scratch outputs and keeps the fastest (see there for when
it does not); the launch recording records them all for the ahead-of-time compile.

Matmuls: ``tl.dot`` on the weights' dtype with float32 accumulation (bfloat16 / float16
under autocast; float32 as TF32 unless ``torch.get_float32_matmul_precision()`` is
"highest"); float64 data multiplies and accumulates in float64. Element-wise math in float32
(float64 for float64 data).
"""
from .backward import coupling_half_step_bwd_kernel, coupling_weight_grad_kernel
from .forward import coupling_half_step_fwd_kernel
from .function import CouplingHalfStepFunction, SublayerCouplingsFunction, coupling_half_step, sublayer_couplings
from .half_step import activation_shapes, coupling_half_step_backward, coupling_half_step_forward
from .sublayer import half_step_order, sublayer_buffer_shapes, sublayer_couplings_backward, sublayer_couplings_forward
from .tiles import (
    AUTOTUNE_ENV,
    GPU_TILES,
    MAX_REGISTERS,
    MIN_TILE,
    TUNING_CONFIGS,
    WEIGHT_GRAD_MAX_ROWS,
    TileConfig,
    choose_tiles,
    tile_candidates,
    tile_config,
    tuning_enabled,
)
from .weights import HalfStepWeights, pair_weights

__all__ = [
    "coupling_half_step",
    "sublayer_couplings",
    "CouplingHalfStepFunction",
    "SublayerCouplingsFunction",
    "coupling_half_step_fwd_kernel",
    "coupling_half_step_bwd_kernel",
    "coupling_weight_grad_kernel",
    "HalfStepWeights",
    "TileConfig",
    "TUNING_CONFIGS",
    "GPU_TILES",
    "AUTOTUNE_ENV",
    "MAX_REGISTERS",
    "MIN_TILE",
    "WEIGHT_GRAD_MAX_ROWS",
    "tile_candidates",
    "tile_config",
    "tuning_enabled",
    "choose_tiles",
    "activation_shapes",
    "coupling_half_step_forward",
    "coupling_half_step_backward",
    "pair_weights",
    "half_step_order",
    "sublayer_buffer_shapes",
    "sublayer_couplings_forward",
    "sublayer_couplings_backward",
]
