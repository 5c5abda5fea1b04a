"""Factorised priors over the latents (paper sec. 3.6, appendix D).

Both priors take a temperature ``T`` (a float or a tensor broadcastable to ``z``, e.g. one
value per latent from a per-level temperature): the Laplace prior has scale ``T/sqrt(2)``
and the Gaussian standard deviation ``T``, so the variance at temperature ``T`` is ``T**2``.
``T = 0`` is the point mass at zero: sampling returns zeros.
"""
from __future__ import annotations

import math

import torch

from .errors import InputError

__all__ = ["Prior", "LaplacePrior", "GaussianPrior", "make_prior", "PRIORS"]


class Prior:
    name = "prior"

    def log_prob(self, z: torch.Tensor, temperature=1.0) -> torch.Tensor:
        """Elementwise log-density of ``z`` (same shape); sum it for the joint density."""
        raise NotImplementedError

    def sample(self, shape, temperature, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LaplacePrior(Prior):
    """``p(z) = exp(-|z|/b) / (2b)`` with ``b = T/sqrt(2)``."""

    name = "laplace"

    def log_prob(self, z, temperature=1.0):
        b = torch.as_tensor(temperature, dtype=z.dtype, device=z.device) / math.sqrt(2.0)
        return -torch.log(2 * b) - z.abs() / b

    def sample(self, shape, temperature, generator=None, device=None, dtype=torch.float32):
        b = torch.as_tensor(temperature, dtype=dtype, device=device) / math.sqrt(2.0)
        # Inverse CDF on u in (-1/2, 1/2); 1 - 2|u| stays in (0, 1] so the log is finite.
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype) - 0.5
        return -b * torch.sign(u) * torch.log1p(-2 * u.abs())


class GaussianPrior(Prior):
    """``N(0, T**2)``."""

    name = "gaussian"

    def log_prob(self, z, temperature=1.0):
        std = torch.as_tensor(temperature, dtype=z.dtype, device=z.device)
        return -0.5 * (z / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)

    def sample(self, shape, temperature, generator=None, device=None, dtype=torch.float32):
        std = torch.as_tensor(temperature, dtype=dtype, device=device)
        return std * torch.randn(shape, generator=generator, device=device, dtype=dtype)


PRIORS = {"laplace": LaplacePrior, "gaussian": GaussianPrior}


def make_prior(name: str) -> Prior:
    if name not in PRIORS:
        raise InputError(f"unknown prior {name!r}; expected one of {tuple(PRIORS)}")
    return PRIORS[name]()
