"""Factorised priors over the latents (paper sec. 3.6, appendix D).

Both priors take a temperature ``T`` (a float or a tensor broadcastable to ``z``, e.g. one
value per latent from a per-level temperature): the Laplace prior has scale ``T/sqrt(2)``
and the Gaussian standard deviation ``T``, so the variance at temperature ``T`` is ``T**2``.
``T = 0`` is the point mass at zero: sampling returns zeros.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import InputError
from .precision import accumulator_dtype

__all__ = ["Prior", "LaplacePrior", "GaussianPrior", "make_prior", "PRIORS"]


class Prior:
    name = "prior"

    def log_prob(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Elementwise log-density of ``z`` (same shape); sum it for the joint density."""
        raise NotImplementedError

    def sample(self, shape: Sequence[int], temperature: float | torch.Tensor, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def log_prob_sum(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``(B,)`` joint log-density of each sample of ``z (B, ...)``.

        Computed and summed in the accumulator dtype (float32 for float16 / bfloat16 ``z``,
        float64 for float64): a bfloat16 sum over thousands of values would be off by
        about 1e-3 relative.
        """
        return self.log_prob(z.to(accumulator_dtype(z.dtype)), temperature).flatten(1).sum(dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LaplacePrior(Prior):
    """``p(z) = exp(-|z|/b) / (2b)`` with ``b = T/sqrt(2)``."""

    name = "laplace"

    def log_prob(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        b = torch.as_tensor(temperature, dtype=z.dtype, device=z.device) / math.sqrt(2.0)
        return -torch.log(2 * b) - z.abs() / b

    def sample(self, shape: Sequence[int], temperature: float | torch.Tensor, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # Inverse CDF of one uniform draw per value, computed in the accumulator dtype
        # (float32 for half-precision models, whose own uniform grid is 2**-8 or 2**-11) and
        # cast at the end. torch.rand returns multiples of 2**-digits in [0, 1); shifting
        # u - 1/2 by half a grid step gives a grid symmetric about 0 that stays strictly
        # inside (-1/2, 1/2), exactly representable, so 1 - 2|u| >= 2**-digits and the log
        # is finite at both ends of the draw (|z| <= digits * ln 2 * b). The clamp only
        # matters for a generator that is not on that grid.
        work = accumulator_dtype(dtype)
        grid = torch.finfo(work).eps / 2  # 2**-24 for float32, 2**-53 for float64
        b = torch.as_tensor(temperature, dtype=work, device=device) / math.sqrt(2.0)
        u = torch.rand(shape, generator=generator, device=device, dtype=work) - 0.5 + grid / 2
        tail = torch.clamp(1 - 2 * u.abs(), min=grid)
        return (-b * torch.sign(u) * torch.log(tail)).to(dtype)


class GaussianPrior(Prior):
    """``N(0, T**2)``."""

    name = "gaussian"

    def log_prob(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        std = torch.as_tensor(temperature, dtype=z.dtype, device=z.device)
        return -0.5 * (z / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)

    def sample(self, shape: Sequence[int], temperature: float | torch.Tensor, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        std = torch.as_tensor(temperature, dtype=dtype, device=device)
        return std * torch.randn(shape, generator=generator, device=device, dtype=dtype)


PRIORS = {"laplace": LaplacePrior, "gaussian": GaussianPrior}


def make_prior(name: str) -> Prior:
    if name not in PRIORS:
        raise InputError(f"unknown prior {name!r}; expected one of {tuple(PRIORS)}")
    return PRIORS[name]()
