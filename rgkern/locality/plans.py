"""Cone plans: the dirty-patch schedule of a local change, and running it on a compact state.

A change of the pixels in a region (x -> z) or of some latents (z -> x) reaches only the
patches of its cone, sublayer by sublayer (``Geometry.inference_patches`` /
``generation_patches``). :func:`build_cone_plan` turns such a schedule into index tables
(which patches, which pixels, where those pixels live in a compact state holding only the
values of the cone's positions); :func:`run_cone_plan` runs the model's sublayers on that
compact state, differentiably, without ever touching a full image. The incremental encoder
and decoder (:mod:`rgkern.locality.incremental`), restricted generation
(:mod:`rgkern.locality.region`) and the receptive fields (:mod:`rgkern.tools.explain`) all
run plans.

Conventions: masks are bool ``(L, L)`` and apply to every sample and every channel; a
"position" is a flat pixel index ``i * L + j``; compact values are ``(B, C, n)`` over a
sorted list of ``n`` positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from ..core.errors import InputError

if TYPE_CHECKING:
    from ..core.geometry import Geometry
    from ..core.model import RGFlow

__all__ = ["ConePlan", "build_cone_plan", "run_cone_plan", "PLAN_CACHE_SIZE"]

#: How many plans the caches of :mod:`rgkern.locality` keep (oldest dropped first).
PLAN_CACHE_SIZE = 64

@dataclass(frozen=True, eq=False)
class _Stage:
    """One sublayer's share of a :class:`ConePlan` (all tensors on the plan's device).

    ``patches (P',)``: patch indices to evaluate; ``row_index (P', D)``: their element
    indices into a ``(C, L, L)`` image (a subset of ``Geometry.row_index``); ``pixels
    (P', k*k)``: their flat pixel positions; ``slots (P', k*k)``: where those pixels live
    in the compact state; ``fresh (P', k*k)``: True where the pixel is already dirty when
    this sublayer runs (read from the compact state), False where its cached value holds;
    ``passthrough (E,)``: element indices of pixels dirty on entry that no evaluated patch
    covers (copied unchanged to the next cached image by the in-place update).
    """

    sublayer: int
    patches: torch.Tensor
    row_index: torch.Tensor
    pixels: torch.Tensor
    slots: torch.Tensor
    fresh: torch.Tensor
    all_fresh: bool
    passthrough: torch.Tensor


@dataclass(frozen=True, eq=False)
class ConePlan:
    """The dirty-patch schedule of one change, in the order the sublayers run.

    Attributes:
        positions: LongTensor ``(n,)``, sorted flat positions of every pixel the change
            reaches (the start mask plus the pixels of every evaluated patch): the compact
            state holds the values at these positions.
        start_slots: LongTensor ``(n0,)``, slots of the start mask's positions (row-major).
        start_elements: LongTensor ``(C * n0,)``, flat indices into a ``(C, L, L)`` image of
            the start mask's values, channel by channel (where an update writes the new input).
        stages: one :class:`_Stage` per sublayer, in running order.
        patch_evals: patches evaluated per image (sum over stages).
        covers_everything: True if every patch of every sublayer is evaluated.
        inverse: True for the z -> x direction.
    """

    positions: torch.Tensor
    start_slots: torch.Tensor
    start_elements: torch.Tensor
    stages: tuple
    patch_evals: int
    covers_everything: bool
    inverse: bool

    def slots_of(self, mask: torch.Tensor) -> torch.Tensor:
        """Slots (LongTensor, plan device) of the True positions of bool ``mask (L, L)``.

        Raises ``ValueError`` if a position of ``mask`` is not in ``positions``.
        """
        wanted = mask.detach().cpu().flatten().nonzero().flatten()
        positions = self.positions.cpu()
        slots = torch.searchsorted(positions, wanted)
        inside = slots < len(positions)
        if not bool(inside.all()) or not torch.equal(positions[slots], wanted):
            raise InputError("mask has positions outside the plan's cone")
        return slots.to(self.positions.device)


def build_cone_plan(geometry: Geometry, start: torch.Tensor, stages: Iterable[tuple[int, torch.Tensor]], inverse: bool,
                    device: torch.device | str = "cpu") -> ConePlan:
    """Build a :class:`ConePlan` from a start mask and ``(sublayer, patch indices)`` pairs.

    Args:
        geometry: the model's :class:`rgkern.core.geometry.Geometry`.
        start: bool ``(L, L)``, the positions whose values are given (changed pixels for an
            encode, changed latents for a decode).
        stages: iterable of ``(sublayer index, LongTensor of patch indices)`` in running
            order (x -> z order of sublayers for an encode, reversed for a decode).
        inverse: the direction the sublayers run in.
        device: where the plan's index tensors live.
    """
    # Index tables are built outside inference mode so that a plan first made under
    # torch.inference_mode() can later serve a pass that autograd records.
    with torch.inference_mode(False):
        L, C = geometry.image_size, geometry.channels
        plane = L * L
        start_flat = start.detach().cpu().flatten().clone()
        stages = [(int(s), idx.detach().cpu().clone().long()) for s, idx in stages]
        reached = start_flat.clone()
        for s, idx in stages:
            reached[geometry.sublayers[s].pixel_index[idx].flatten()] = True
        positions = reached.nonzero().flatten()
        slot_of = torch.full((plane,), -1, dtype=torch.long)
        slot_of[positions] = torch.arange(len(positions))
        channel_offsets = torch.arange(C)[:, None] * plane

        dirty = start_flat.clone()
        built = []
        covers_everything = True
        for s, idx in stages:
            sub = geometry.sublayers[s]
            covers_everything &= len(idx) == sub.num_patches
            pixels = sub.pixel_index[idx]  # (P', k*k)
            fresh = dirty[pixels]
            covered = torch.zeros(plane, dtype=torch.bool)
            covered[pixels.flatten()] = True
            passthrough_pixels = (dirty & ~covered).nonzero().flatten()
            passthrough = (channel_offsets + passthrough_pixels[None, :]).flatten()
            dirty[pixels.flatten()] = True
            built.append(
                _Stage(
                    sublayer=s,
                    patches=idx.to(device),
                    row_index=geometry.row_index(s)[idx].to(device),
                    pixels=pixels.to(device),
                    slots=slot_of[pixels].to(device),
                    fresh=fresh.to(device),
                    all_fresh=bool(fresh.all()),
                    passthrough=passthrough.to(device),
                )
            )
        return ConePlan(
            positions=positions.to(device),
            start_slots=slot_of[start_flat.nonzero().flatten()].to(device),
            start_elements=(channel_offsets + start_flat.nonzero().flatten()[None, :]).flatten().to(device),
            stages=tuple(built),
            patch_evals=sum(len(idx) for _, idx in stages),
            covers_everything=covers_everything and len(stages) == len(geometry.sublayers),
            inverse=inverse,
        )


def run_cone_plan(model: RGFlow, plan: ConePlan, values: torch.Tensor, base_images: Sequence[torch.Tensor] | None = None,
                  backend: str = "torch") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``plan`` on a compact state; differentiable, no full image is touched.

    Args:
        model: the :class:`rgkern.RGFlow` whose sublayers run.
        plan: a :class:`ConePlan`.
        values: ``(B', C, n)`` compact state over ``plan.positions``; only the start slots
            need meaningful values (others are overwritten before they are read).
        base_images: where entries that are not yet dirty are read from: a sequence indexed
            by sublayer ``s`` giving that sublayer's input image ``(B, C, L, L)`` in the
            plan's direction, with ``B' = B * R`` (sample ``b`` of the base serves rows
            ``b*R .. b*R + R-1`` of the state). Not needed when every read is fresh.
        backend: concrete backend for the couplings (``"torch"`` or ``"triton"``).
    Returns:
        ``(values, logdets)``: the final compact state ``(B', C, n)`` and, per stage, the
        log-det of each evaluated patch ``(B', P')`` (float64 for float64 data, else float32)
        in the plan's direction.
    """
    batch, C = values.shape[0], values.shape[1]
    D = model.geometry.patch_dim
    logdets = []
    for stage in plan.stages:
        num, kk = stage.pixels.shape
        rows = values[:, :, stage.slots]  # (B', C, P', k*k)
        if not stage.all_fresh:
            if base_images is None:
                raise InputError("this plan reads cached values, but no base_images were given")
            base = base_images[stage.sublayer].flatten(2)[:, :, stage.pixels]
            if base.shape[0] != batch:
                base = base.repeat_interleave(batch // base.shape[0], dim=0)
            rows = torch.where(stage.fresh, rows, base)
        rows = rows.permute(0, 2, 1, 3).reshape(batch * num, D)
        out, logdet = model.sublayers[stage.sublayer].transform_rows(rows, inverse=plan.inverse, backend=backend)
        out = out.reshape(batch, num, C, kk).permute(0, 2, 1, 3).reshape(batch, C, num * kk)
        values = values.index_copy(2, stage.slots.flatten(), out)
        logdets.append(logdet.reshape(batch, num))
    return values, logdets

