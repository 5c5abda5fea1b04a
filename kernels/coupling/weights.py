"""The stacked weights of the fused coupling half-step (shapes in :mod:`rgkern.kernels.coupling`)."""
from typing import NamedTuple, Optional

import torch


class HalfStepWeights(NamedTuple):
    """The stacked weights of one half-step (shapes in the module docstring).

    The weights ``w_*`` share one dtype, the compute dtype (the rows' dtype, or a narrower
    one under autocast); biases and slopes share one dtype, the weights' or the rows'.

    ``w_mid``/``b_mid``/``slope_mid`` are None when n_mlp < 2, ``w_first``/``b_first``/
    ``slope_first`` when n_mlp = 0.
    """

    w_first: Optional[torch.Tensor]
    b_first: Optional[torch.Tensor]
    slope_first: Optional[torch.Tensor]
    w_mid: Optional[torch.Tensor]
    b_mid: Optional[torch.Tensor]
    slope_mid: Optional[torch.Tensor]
    w_last: torch.Tensor
    b_last: torch.Tensor
    slope_last: torch.Tensor

    @property
    def n_res(self) -> int:
        return self.w_last.shape[0]

    @property
    def n_mid(self) -> int:
        return 0 if self.w_mid is None else self.w_mid.shape[0]

    @property
    def n_mlp(self) -> int:
        return 0 if self.w_first is None else self.n_mid + 1

    @property
    def hidden(self) -> int:
        """Width of the hidden linears (the patch width D when there are none)."""
        return self.w_last.shape[-1]




def pair_weights(weights: HalfStepWeights, pair: int) -> HalfStepWeights:
    """Pair ``pair``'s :class:`HalfStepWeights` of a sublayer's stacked weights (leading pair dimension)."""
    return HalfStepWeights(*(None if t is None else t[pair] for t in weights))



def _present(weights: HalfStepWeights) -> HalfStepWeights:
    """``weights`` with the absent tensors replaced by a present one (the kernels never read them)."""
    return HalfStepWeights(*(weights.w_last if t is None else t for t in weights))



def _weight_grad_buffers(weights: HalfStepWeights, empty, device) -> HalfStepWeights:
    """Buffers for the w and b gradients (None for the slopes, which the partial sums give)."""
    return HalfStepWeights(*(
        None if t is None or name.startswith("slope") else empty(t.shape, dtype=t.dtype, device=device)
        for name, t in zip(HalfStepWeights._fields, weights)
    ))


def _with_slopes(grads: HalfStepWeights, weights: HalfStepWeights, first, mid, last) -> HalfStepWeights:
    """``grads`` with the slope gradients, each shaped and typed as its slope (None where absent)."""
    def shaped(values, like):
        return None if like is None else values.reshape(like.shape).to(like.dtype)

    return grads._replace(slope_first=shaped(first, weights.slope_first), slope_mid=shaped(mid, weights.slope_mid),
                          slope_last=shaped(last, weights.slope_last))

