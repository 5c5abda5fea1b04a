"""Incremental encoding and decoding: recompute only the patches a local change can reach.

Every sublayer of RG-Flow is local, so changing the pixels of a region changes only the
latents in its inference cone, and changing some latents changes only the pixels in their
generation cone (paper sec. 3.4, 3.5; docs/design.md section 2). This module turns that into
work saved:

* :class:`IncrementalEncoder` keeps the input image of every sublayer from one full x -> z
  pass. :meth:`IncrementalEncoder.update` takes a new image that differs from the cached one
  only inside ``region`` and re-evaluates, sublayer by sublayer, only the dirty patches
  (``model.geometry.inference_patches(region)``): gather their rows from the cached input,
  run the sublayer's RNVP stack on that small batch, write them into the next cached image.
  For a fixed region the work grows as O(log L) against O(L**2) for a full pass (60, 85,
  110, 135, 160 patch evaluations for a 10x10 region at L = 32 .. 512, k = 4).
* :class:`IncrementalDecoder` does the same in the z -> x direction for a change of latents
  (``model.geometry.generation_patches(latents)``).
* :meth:`IncrementalEncoder.evaluate` is the differentiable counterpart used by inpainting
  (:mod:`rgkern.locality.inpaint`): it runs the same dirty-patch schedule (a
  :class:`~rgkern.locality.plans.ConePlan`) on a compact state holding only the values of
  the cone's pixel positions, never touches a full image, and leaves the cache alone, so
  autograd can flow through ``Sublayer.transform_rows``
  (:func:`rgkern.locality.region.decode_region` does the same for generation).

Conventions: images are ``(B, C, L, L)``; masks (``region``, ``latents``) are bool
``(L, L)`` and apply to every sample and every channel; a "position" is a flat pixel index
``i * L + j``; compact values are ``(B, C, n)`` over a sorted list of ``n`` positions.
Patch counts (``last_patch_evals``) are per image: the batch evaluates ``B`` times as many
coupling rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import ops
from ..core.cache import BoundedCache
from ..core.errors import InputError, InputTypeError
from .plans import PLAN_CACHE_SIZE, ConePlan, build_cone_plan, run_cone_plan

__all__ = ["IncrementalEncoder", "IncrementalDecoder", "ConeEvaluation"]


def _sum_logdets(logdets, batch, dtype, device):
    total = torch.zeros(batch, dtype=dtype, device=device)
    for ld in logdets:
        total = total + ld.sum(dim=1)
    return total


# --------------------------------------------------------------------------------- checks
def _fingerprint(parameters) -> tuple:
    """Cheap identity of the weights: storage, version counter, dtype, device of each parameter.

    ``optimizer.step()``, ``load_state_dict``, in-place edits under ``torch.no_grad()`` and
    ``model.to(...)`` all change it. Writes through ``param.data`` bypass the version
    counter, and a Parameter object replaced by another is not in the list taken at
    construction: neither is seen; call :meth:`IncrementalEncoder.rebuild` after those.
    """
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)


def _check_like(value, cached: torch.Tensor, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != cached.shape:
        raise InputError(f"{name} has shape {tuple(value.shape)}, expected the cached shape {tuple(cached.shape)}")
    if value.dtype != cached.dtype:
        raise InputTypeError(f"{name} has dtype {value.dtype}, expected the cached dtype {cached.dtype}")
    if value.device != cached.device:
        raise InputError(f"{name} is on {value.device}, expected the cached device {cached.device}")


# --------------------------------------------------------------------------------- cached passes
class _CachedPass:
    """Shared machinery of :class:`IncrementalEncoder` and :class:`IncrementalDecoder`.

    ``self._images[s]`` is the input of sublayer ``s`` in the x -> z direction
    (``_images[0] = x``, ``_images[2H] = z``); the decoder caches the same images, read in
    the other order. ``self._patch_logdets[s]`` is ``(B, P_s)``, the log-det of every patch
    of sublayer ``s`` in the cached direction.
    """

    _inverse = False
    _input_name = "x"
    _mask_name = "region"

    def __init__(self, model, image: torch.Tensor):
        model.check_images(image, self._input_name, check_finite=not self._inverse)
        self.model = model
        self.geometry = model.geometry
        # Walking model.parameters() costs ~10 ms per call on a deep model; keep the list.
        self._parameters = list(model.parameters())
        self._plans = BoundedCache(PLAN_CACHE_SIZE)
        self.last_patch_evals = 0
        self.last_update_was_full = False
        self._full_pass(image.detach())
        self.last_patch_evals = self.total_patches
        self.last_update_was_full = True

    # -------------------------------------------------------------- properties
    @property
    def total_patches(self) -> int:
        """Patches per image in a full pass (all sublayers)."""
        return sum(s.num_patches for s in self.geometry.sublayers)

    @property
    def logdet(self) -> torch.Tensor:
        """``(B,)`` log-det of the cached pass in its direction (a copy)."""
        return self._logdet.clone()

    @property
    def sublayer_inputs(self) -> list:
        """The cached input image of each sublayer in this pass's direction, indexed by sublayer.

        Entry ``s`` is what sublayer ``s`` reads (its inverse, for the decoder): the
        ``base_images`` that :func:`rgkern.locality.plans.run_cone_plan` takes. The cache
        itself, not copies: read it, do not write it.
        """
        return self._images[1:] if self._inverse else self._images[:-1]

    def _order(self):
        n = len(self.geometry.sublayers)
        return range(n - 1, -1, -1) if self._inverse else range(n)

    def _source(self, s):
        return self._images[s + 1] if self._inverse else self._images[s]

    def _target_slot(self, s):
        return s if self._inverse else s + 1

    @property
    def _input(self) -> torch.Tensor:
        return self._images[-1] if self._inverse else self._images[0]

    @property
    def _output(self) -> torch.Tensor:
        return self._images[0] if self._inverse else self._images[-1]

    # -------------------------------------------------------------- full pass
    @torch.no_grad()
    def _full_pass(self, image: torch.Tensor) -> None:
        """Evaluate every patch of every sublayer; exactly the model's own pass."""
        S = len(self.geometry.sublayers)
        backend = ops.resolve_backend(self.model.backend, image)
        batch = image.shape[0]
        images = [None] * (S + 1)
        patch_logdets = [None] * S
        # Row-major copy whatever the input's strides (channels_last, transposed): the cache
        # is written in place through flat views.
        cur = image.clone(memory_format=torch.contiguous_format)
        images[S if self._inverse else 0] = cur
        for s in self._order():
            row_index = self.geometry.row_index(s, cur.device)
            rows = ops.gather_patches(cur, row_index, backend)
            rows, logdet = self.model.sublayers[s].transform_rows(rows, inverse=self._inverse, backend=backend)
            cur = ops.scatter_patches(cur, rows, row_index, backend)
            images[self._target_slot(s)] = cur
            patch_logdets[s] = logdet.reshape(batch, -1)
        self._images = images
        self._patch_logdets = patch_logdets
        self._recompute_logdet()
        self._fingerprint = _fingerprint(self._parameters)
        self._derived = BoundedCache(PLAN_CACHE_SIZE)
        self._consistent = True

    def _recompute_logdet(self) -> None:
        # Same summation order as the model's own pass (sublayer by sublayer, patch sums first),
        # so after a full pass the log-det is bit-identical to the model's.
        first = self._patch_logdets[0]
        self._logdet = _sum_logdets((self._patch_logdets[s] for s in self._order()), first.shape[0], first.dtype, first.device)

    def rebuild(self) -> None:
        """Recompute the whole cache from the cached input (after weights changed behind our back)."""
        self._full_pass(self._input)

    # -------------------------------------------------------------- plans
    def _plan(self, mask_cpu: torch.Tensor) -> ConePlan:
        device = self._input.device
        key = (mask_cpu.numpy().tobytes(), str(device))
        plan = self._plans.get(key)
        if plan is None:
            if self._inverse:
                patches = self.geometry.generation_patches(mask_cpu)
            else:
                patches = self.geometry.inference_patches(mask_cpu)
            stages = [(s, patches[s]) for s in self._order()]
            plan = build_cone_plan(self.geometry, mask_cpu, stages, self._inverse, device)
            self._plans[key] = plan
        return plan

    def plan(self, mask: torch.Tensor) -> ConePlan:
        """The :class:`ConePlan` of a change at ``mask`` (bool ``(L, L)``), cached."""
        return self._plan(self.geometry.check_mask(mask, self._mask_name))

    # -------------------------------------------------------------- update
    @torch.no_grad()
    def _update(self, new: torch.Tensor, mask: torch.Tensor, check: bool) -> torch.Tensor:
        cached_input = self._input
        _check_like(new, cached_input, self._input_name + "_new")
        mask_cpu = self.geometry.check_mask(mask, self._mask_name)
        if check:
            outside = ((new != cached_input).any(dim=1) & ~mask_cpu.to(new.device)).any(dim=0)
            if bool(outside.any()):
                where = outside.nonzero()
                raise InputError(
                    f"{self._input_name}_new differs from the cached {self._input_name} at {len(where)} "
                    f"position(s) outside {self._mask_name} (first at row, col {tuple(where[0].tolist())}); "
                    f"{self._mask_name} must cover every changed position"
                )
        plan = self._plan(mask_cpu)  # cached per mask: after the first update of a region no index work
        batch = new.shape[0]
        new_values = new.reshape(batch, -1)[:, plan.start_elements]
        if not self._inverse and self.model.check_inputs:
            if not bool(torch.isfinite(new_values).all()):
                bad = int((~torch.isfinite(new_values)).sum())
                raise InputError(f"x_new contains {bad} non-finite values (NaN or inf) in region; expected finite values")

        if _fingerprint(self._parameters) != self._fingerprint or not self._consistent:
            # The weights changed since the cache was built (or an update was interrupted
            # half-way): every cached image is suspect.
            self._full_pass(new.detach())
            self.last_patch_evals, self.last_update_was_full = self.total_patches, True
            return self._output.clone()
        if len(plan.start_slots) == 0:
            self.last_patch_evals, self.last_update_was_full = 0, False
            return self._output.clone()
        if plan.covers_everything:
            self._full_pass(new.detach())
            self.last_patch_evals, self.last_update_was_full = self.total_patches, True
            return self._output.clone()

        backend = ops.resolve_backend(self.model.backend, new)
        start = self._input.view(batch, -1)
        self._consistent = False  # until every stage below is written
        start.index_copy_(1, plan.start_elements, new_values)
        for stage in plan.stages:
            s = stage.sublayer
            source = self._source(s)
            target = self._images[self._target_slot(s)].view(batch, -1)
            rows = ops.gather_patches(source, stage.row_index, backend)
            rows, logdet = self.model.sublayers[s].transform_rows(rows, inverse=self._inverse, backend=backend)
            # In place: ops.scatter_patches returns a new full image, an O(L**2) copy per
            # sublayer that would dominate the update at large L.
            target.index_copy_(1, stage.passthrough, source.reshape(batch, -1)[:, stage.passthrough])
            target.index_copy_(1, stage.row_index.flatten(), rows.reshape(batch, -1))
            self._patch_logdets[s].index_copy_(1, stage.patches, logdet.reshape(batch, -1))
        self._recompute_logdet()
        self._derived.clear()
        self._consistent = True
        self.last_patch_evals, self.last_update_was_full = plan.patch_evals, False
        return self._output.clone()


class IncrementalEncoder(_CachedPass):
    """x -> z with a cache of every sublayer's input, for cheap updates of local changes.

    ``inc = IncrementalEncoder(model, x)`` runs one full pass (no autograd; ``x`` is
    detached) and caches the input image of every sublayer and the log-det of every patch.
    ``inc.update(x_new, region)`` then returns ``model.encode(x_new)[0]`` (to floating-point
    tolerance; latents outside the region's inference cone are bit-identical to before)
    while evaluating only the dirty patches, and updates the cache to ``x_new``.

    Attributes:
        z: ``(B, C, L, L)`` latents of the cached image (a copy).
        x: ``(B, C, L, L)`` the cached image (a copy).
        logdet: ``(B,)`` equal to ``model.encode(x)[1]`` for the cached image.
        last_patch_evals: patches evaluated by the last update (or the construction), per
            image: the sum over sublayers of the dirty patch counts, 0 for an empty region and
            :attr:`total_patches` for a full pass. A batch of B images evaluates B times as
            many coupling rows.
        last_update_was_full: True when the last update ran a full pass: the dirty set
            covered every patch of every sublayer, or the weights had changed.

    Weight changes: the cache remembers a fingerprint of the parameters (storage pointer and
    autograd version counter of each); if it differs at the next :meth:`update` (an
    optimiser step, ``load_state_dict``, an in-place edit, ``model.to``), that update runs a
    full pass and rebuilds the cache (``last_update_was_full = True``). Writes through
    ``param.data`` bypass the version counter, and a Parameter object replaced by a new one
    is not in the list taken at construction: call :meth:`rebuild` after those.

    The cached tensors are updated in place, so :meth:`update` never records autograd; for a
    differentiable incremental pass use :meth:`evaluate`.
    """

    @property
    def z(self) -> torch.Tensor:
        return self._images[-1].clone()

    @property
    def x(self) -> torch.Tensor:
        return self._images[0].clone()

    def update(self, x_new: torch.Tensor, region: torch.Tensor, check_region: bool = True) -> torch.Tensor:
        """Re-encode after the pixels in ``region`` changed; returns ``z`` ``(B, C, L, L)``.

        Args:
            x_new: ``(B, C, L, L)``, same shape, dtype and device as the cached image, equal to
                it outside ``region``.
            region: bool ``(L, L)``, True at pixel positions that may have changed (in any
                channel or sample).
            check_region: verify that ``x_new`` equals the cached image outside ``region`` and
                raise ``ValueError`` if not (one O(L**2) comparison, no network evaluation;
                pass False when the caller guarantees it). The check that the new values
                inside ``region`` are finite follows ``model.check_inputs``, as in
                ``model.encode``; with both off, an update whose plan is cached issues no
                host synchronisation.
        Returns:
            the new latents, a fresh tensor (the cache is not exposed).
        Raises:
            TypeError: region not a bool tensor, x_new of another dtype.
            ValueError: region not ``(L, L)``; x_new of another shape or device, non-finite
                inside region, or (with ``check_region``) different outside region.
        """
        return self._update(x_new, region, check_region)

    def evaluate(self, values: torch.Tensor, region: torch.Tensor) -> "ConeEvaluation":
        """Differentiable encode of the cached image with its ``region`` pixels replaced.

        The cache is read, never written (except that a weight change since the cache was
        built triggers :meth:`rebuild` first). Only the dirty patches are evaluated and no
        full image is built, so the cost (and the autograd graph) is the size of the cone.

        Args:
            values: ``(B * R, C, n)``: for each cached sample ``b`` and repeat ``r`` (row
                ``b*R + r``), the new values of the ``n`` pixels of ``region`` in row-major
                order (``x[..., region]``). Must be finite.
            region: bool ``(L, L)``, non-empty.
        Returns:
            a :class:`ConeEvaluation`: the latents at the positions of the region's inference
            cone, the new log-det and log-density (equal to ``model.encode`` /
            ``model.log_prob`` of the full new image), all differentiable in ``values``.
        """
        mask_cpu = self.geometry.check_mask(region, "region")
        if not bool(mask_cpu.any()):
            raise InputError("region is empty; evaluate needs at least one changed pixel")
        batch = self._images[0].shape[0]
        C, n = self.geometry.channels, int(mask_cpu.sum())
        if not isinstance(values, torch.Tensor):
            raise InputTypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() != 3 or values.shape[1:] != (C, n) or values.shape[0] % batch:
            raise InputError(
                f"values must have shape (B * R, {C}, {n}) with B = {batch} cached samples, got {tuple(values.shape)}"
            )
        if values.dtype != self._images[0].dtype:
            raise InputTypeError(f"values have dtype {values.dtype}, expected the cached dtype {self._images[0].dtype}")
        if _fingerprint(self._parameters) != self._fingerprint or not self._consistent:
            self.rebuild()
        plan = self._plan(mask_cpu)
        backend = ops.resolve_backend(self.model.backend, values)
        repeats = values.shape[0] // batch
        state = values.new_zeros(values.shape[0], C, len(plan.positions))
        state = state.index_copy(2, plan.start_slots, values)
        state, logdets = run_cone_plan(self.model, plan, state, self._images, backend)

        derived = self._derived.get(plan)
        if derived is None:
            with torch.no_grad():
                old = [self._patch_logdets[st.sublayer][:, st.patches] for st in plan.stages]
                clean_logdet = self._logdet - _sum_logdets(old, batch, self._logdet.dtype, self._logdet.device)
                z = self._images[-1]
                prior_all = self.model.prior.log_prob_sum(z)
                prior_cone = self.model.prior.log_prob_sum(z.flatten(2)[:, :, plan.positions])
                clean_prior = (prior_all - prior_cone).to(self._logdet.dtype)
            derived = self._derived[plan] = (clean_logdet, clean_prior)
        clean_logdet, clean_prior = derived
        new_logdet = _sum_logdets(logdets, values.shape[0], self._logdet.dtype, values.device)
        logdet = clean_logdet.repeat_interleave(repeats) + new_logdet
        prior_cone = self.model.prior.log_prob_sum(state).to(logdet.dtype)
        log_prob = clean_prior.repeat_interleave(repeats) + prior_cone + logdet
        return ConeEvaluation(z=state, positions=plan.positions, logdet=logdet, log_prob=log_prob,
                              patch_evals=plan.patch_evals)


@dataclass
class ConeEvaluation:
    """Result of :meth:`IncrementalEncoder.evaluate`.

    Attributes:
        z: ``(B * R, C, n)`` latents at ``positions`` (the inference cone, row-major).
        positions: LongTensor ``(n,)`` flat positions ``i * L + j`` of those latents.
        logdet: ``(B * R,)`` ``log|det dz/dx|`` of the whole new image.
        log_prob: ``(B * R,)`` ``model.log_prob`` of the whole new image (nats).
        patch_evals: patches evaluated per image.
    """

    z: torch.Tensor
    positions: torch.Tensor
    logdet: torch.Tensor
    log_prob: torch.Tensor
    patch_evals: int


class IncrementalDecoder(_CachedPass):
    """z -> x with a cache of every sublayer's input, for cheap updates of a few latents.

    ``dec = IncrementalDecoder(model, z)`` runs one full decode (no autograd) and caches the
    input of every (inverse) sublayer. ``dec.update(z_new, latents)`` returns
    ``model.decode(z_new)`` (to floating-point tolerance; pixels outside the generation cone
    of ``latents`` are bit-identical to before) while evaluating only the patches of
    ``model.geometry.generation_patches(latents)``.

    Attributes ``x``, ``z``, ``last_patch_evals``, ``last_update_was_full``, weight-change
    handling and :meth:`rebuild` are as for :class:`IncrementalEncoder`; ``logdet`` is
    ``log|det dx/dz|`` of the cached decode (``-model.encode(x)[1]``).
    """

    _inverse = True
    _input_name = "z"
    _mask_name = "latents"

    @property
    def x(self) -> torch.Tensor:
        return self._images[0].clone()

    @property
    def z(self) -> torch.Tensor:
        return self._images[-1].clone()

    def update(self, z_new: torch.Tensor, latents: torch.Tensor, check_region: bool = True) -> torch.Tensor:
        """Re-decode after the latents at ``latents`` changed; returns ``x`` ``(B, C, L, L)``.

        Args:
            z_new: ``(B, C, L, L)`` like the cached latents, equal to them outside ``latents``.
            latents: bool ``(L, L)``, True at latent positions that may have changed.
            check_region: verify that ``z_new`` equals the cached latents outside ``latents``.
        Raises as :meth:`IncrementalEncoder.update`.
        """
        return self._update(z_new, latents, check_region)
