"""The stacked weights of the fused coupling half-step: their one definition.

:class:`HalfStepWeights` names the nine tensors once; the operator schemas, the fake
functions, the input checks and the gradient buffers are all derived from it.
"""
from typing import Callable, NamedTuple, Optional

import torch

__all__ = ["HalfStepWeights", "pair_weights"]

# The fields that are None in some layouts (no mid linears for n_mlp < 2, no first for n_mlp = 0).
_OPTIONAL = ("first", "mid")


class HalfStepWeights(NamedTuple):
    """The weights of one half-step, stacked ``[residual block, network]`` (shapes in
    :mod:`rgkern.kernels.coupling`; a whole sublayer's carry a leading pair dimension more).

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
    def hidden_width(self) -> int:
        """Width of the hidden linears (the patch width D when there are none)."""
        return self.w_last.shape[-1]

    # ----------------------------------------------------------------- derived from the fields
    @classmethod
    def parameters(cls) -> list:
        """``(name, annotation)`` of each field, for an operator signature (absent ones ``Tensor?``)."""
        return [(name, Optional[torch.Tensor] if name.endswith(_OPTIONAL) else torch.Tensor) for name in cls._fields]

    @classmethod
    def split_arguments(cls, arguments: tuple) -> tuple:
        """``(HalfStepWeights, rest)`` of operator arguments that start with the nine fields."""
        count = len(cls._fields)
        return cls(*arguments[:count]), tuple(arguments[count:])

    def expected_shapes(self, dim: int) -> dict:
        """The shape each present field must have for rows of width ``dim`` (one half-step's)."""
        n_res, hidden, last_in = self.n_res, self.hidden_width, self.hidden_width if self.w_first is not None else dim
        expected = {"w_last": (n_res, 2, dim, last_in), "b_last": (n_res, 2, dim), "slope_last": (n_res, 2, last_in)}
        if self.w_first is not None:
            expected.update(w_first=(n_res, 2, hidden, dim), b_first=(n_res, 2, hidden), slope_first=(n_res, 2, dim))
            if self.w_mid is not None:
                n_mid = self.n_mid
                expected.update(w_mid=(n_mid, n_res, 2, hidden, hidden), b_mid=(n_mid, n_res, 2, hidden),
                                slope_mid=(n_mid, n_res, 2, hidden))
        return expected

    def contiguous(self) -> "HalfStepWeights":
        return HalfStepWeights(*(None if t is None else t.contiguous() for t in self))

    def present(self) -> "HalfStepWeights":
        """These weights with the absent tensors replaced by a present one (the kernels never read them)."""
        return HalfStepWeights(*(self.w_last if t is None else t for t in self))

    def grad_buffers(self, empty: Callable[..., torch.Tensor], device: torch.device) -> "HalfStepWeights":
        """Buffers for the w and b gradients (None for the slopes, which the partial sums give)."""
        return HalfStepWeights(*(
            None if t is None or name.startswith("slope") else empty(t.shape, dtype=t.dtype, device=device)
            for name, t in zip(self._fields, self)
        ))

    def with_slope_grads(self, weights: "HalfStepWeights", first: torch.Tensor, mid: torch.Tensor,
                         last: torch.Tensor) -> "HalfStepWeights":
        """These gradients with the slope gradients added, each shaped and typed as its slope in
        ``weights`` (None where absent)."""
        def shaped(values, like):
            return None if like is None else values.reshape(like.shape).to(like.dtype)

        return self._replace(slope_first=shaped(first, weights.slope_first), slope_mid=shaped(mid, weights.slope_mid),
                             slope_last=shaped(last, weights.slope_last))

    def as_operator_grads(self, like: torch.Tensor) -> list:
        """The nine gradients as an operator returns them: an absent one empty, and the slopes
        (views of one reduction) copied, since an operator's outputs may not alias."""
        return [like.new_empty(0) if g is None else g.clone() if name.startswith("slope") else g
                for name, g in zip(self._fields, self)]


def pair_weights(weights: HalfStepWeights, pair: int) -> HalfStepWeights:
    """Pair ``pair``'s :class:`HalfStepWeights` of a sublayer's stacked weights (leading pair dimension)."""
    return HalfStepWeights(*(None if t is None else t[pair] for t in weights))
