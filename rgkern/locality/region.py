"""Generation restricted to a region: only the pixels of ``region``, from the latents of its cone.

A pixel depends, through the decode, exactly on the latents of its inference cone, so the
pixels of a region are computed from those latents by evaluating the patches of the
region's inference patches in z -> x order (:func:`region_decode_plan`), on a compact
state (:func:`rgkern.locality.plans.run_cone_plan`): as many patch evaluations as an
incremental encode of the region, no full image and no cache. Inpainting
(:mod:`rgkern.locality.inpaint`) uses it at every optimisation step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core import ops
from ..core.cache import BoundedCache
from ..core.errors import InputError
from .plans import PLAN_CACHE_SIZE, ConePlan, build_cone_plan, run_cone_plan

if TYPE_CHECKING:
    from ..core.geometry import Geometry
    from ..core.model import RGFlow

__all__ = ["region_decode_plan", "decode_cone_values", "decode_region"]

_REGION_PLANS = BoundedCache(PLAN_CACHE_SIZE)


def region_decode_plan(geometry: Geometry, region: torch.Tensor, device: torch.device | str) -> ConePlan:
    """The plan that generates only the pixels of ``region`` from the latents of its cone.

    A pixel depends, through the decode, exactly on the latents of its inference cone
    (paths through the sublayers' patches read the same both ways), so the pixels of
    ``region`` are computed from ``z`` at ``geometry.inference_cone(region)`` by evaluating
    the patches of ``geometry.inference_patches(region)`` in the z -> x order: as many
    patch evaluations as an incremental encode of the region, and no cached image.
    """
    mask_cpu = geometry.check_mask(region, "region")
    # Keyed by the shared geometry itself: two geometries of one size differ in sublayer order.
    key = (geometry, mask_cpu.numpy().tobytes(), str(torch.device(device)))
    plan = _REGION_PLANS.get(key)
    if plan is None:
        patches = geometry.inference_patches(mask_cpu)
        cone = geometry.inference_cone(mask_cpu)
        stages = [(s, patches[s]) for s in range(len(patches) - 1, -1, -1)]
        plan = build_cone_plan(geometry, cone, stages, inverse=True, device=device)
        _REGION_PLANS[key] = plan
    return plan


def decode_cone_values(model: RGFlow, plan: ConePlan, cone_values: torch.Tensor, region_slots: torch.Tensor,
                       backend: str) -> torch.Tensor:
    """Differentiable: latents at ``plan.positions`` ``(B, C, n)`` -> pixels at ``region_slots``."""
    state, _ = run_cone_plan(model, plan, cone_values, None, backend)
    return state[:, :, region_slots]


def decode_region(model: RGFlow, z: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Generate only the pixels of ``region`` from latents: ``model.decode(z)[..., region]``.

    Args:
        model: an :class:`rgkern.RGFlow`.
        z: ``(B, C, L, L)`` latents; only those in ``model.geometry.inference_cone(region)``
            are read.
        region: bool ``(L, L)``, non-empty.
    Returns:
        ``(B, C, n)`` pixel values of the ``n`` positions of ``region`` in row-major order,
        differentiable in ``z``. Work: ``len(inference_patches(region))`` patch evaluations.
    """
    model.check_images(z, "z", check_finite=False)
    geometry = model.geometry
    mask_cpu = geometry.check_mask(region, "region")
    if not bool(mask_cpu.any()):
        raise InputError("region is empty; expected at least one pixel to generate")
    plan = region_decode_plan(geometry, mask_cpu, z.device)
    backend = ops.resolve_backend(model.backend, z)
    cone_values = z.flatten(2)[:, :, plan.positions]
    return decode_cone_values(model, plan, cone_values, plan.slots_of(mask_cpu), backend)
