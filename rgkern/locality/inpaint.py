"""Inpainting by maximum likelihood over the latents of the inference cone (paper appendix F).

Procedure (appendix F): generate ``x_g = G(z_g)``, fill the unknown pixels of ``x`` with
``x_g``'s, map the filled image ``x_f`` back to latents and maximise ``log p(x_f)`` over
``z_g`` with Adam, from several random starts.

Only the latents in the inference cone of the unknown region can change the fill: a pixel
depends through the decode exactly on the latents of its inference cone, so latents
outside it are fixed (their value is irrelevant). With ``incremental=True`` every step
runs, on a compact state over the cone's positions and with autograd through
``Sublayer.transform_rows``:

1. the restricted generation of the unknown pixels from the cone's latents
   (:func:`rgkern.locality.region.decode_cone_values`, the region's inference patches in
   z -> x order);
2. the incremental encode of the filled image (:meth:`IncrementalEncoder.evaluate` on a
   cache of the image with the unknown pixels zeroed), whose log-density equals
   ``model.log_prob(x_f)``.

Per step that is ``2 * len(inference patches)`` patch evaluations per restart (120 for a
10x10 region at L = 32, k = 4, against 340 for two full passes; 320 against 87,380 at
L = 512). ``incremental=False`` is the all-latents baseline of the paper (full decode, full
encode, every latent a free variable). For RG-Flow the two optimise the same function of
the same free values: the gradient for latents outside the cone is exactly zero, so Adam
leaves them where they start, and with the same draws both paths follow the same
trajectory up to rounding (the tests check it).

Restarts: ``init_draws`` random draws of the latents from the prior (at ``temperature``)
are scored by log-likelihood and the best ``restarts`` of them are optimised together as
one batch (Adam acts element-wise and the loss is a sum of per-restart losses, so each
restart follows the trajectory it would follow alone); the restart with the highest final
log-likelihood gives the fill. ``init_draws = restarts`` (the default) skips the
screening; appendix F's recipe is ``init_draws=200, restarts=1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..core import ops
from ..core.errors import InputError, InputTypeError
from ..core.precision import accumulator_dtype
from .incremental import IncrementalEncoder
from .region import decode_cone_values, region_decode_plan

if TYPE_CHECKING:
    from ..core.model import RGFlow, Temperature

__all__ = ["inpaint", "InpaintResult", "InpaintProblem", "NonFiniteRestartsError", "psnr", "central_known_mask"]


@dataclass
class InpaintResult:
    """What :func:`inpaint` returns with ``return_info=True``.

    Attributes:
        images: ``(B, C, L, L)`` filled images; known pixels exactly equal to the input.
        log_prob: ``(B,)`` model-space log-density (nats) of each filled image.
        losses: ``(B, R)`` final loss ``-log p(x_f)`` (nats) of every restart.
        best_restart: ``(B,)`` index of the restart whose fill was kept.
        loss_history: ``(steps, B, R)`` loss of every restart before each Adam step.
        free_latents: ``(B,)`` number of latent values optimised per restart.
        patch_evals_per_step: ``(B,)`` patch evaluations per restart per step (decode plus
            encode), per image.
    """

    images: torch.Tensor
    log_prob: torch.Tensor
    losses: torch.Tensor
    best_restart: torch.Tensor
    loss_history: torch.Tensor
    free_latents: torch.Tensor
    patch_evals_per_step: torch.Tensor


class InpaintProblem:
    """The objective of one inpainting problem: images that share one unknown region.

    Args:
        model: an :class:`rgkern.RGFlow`.
        x: ``(B, C, L, L)`` model-space images; values at unknown pixels are ignored.
        unknown: bool ``(L, L)``, True at the pixels to fill (non-empty).
        incremental: optimise the cone's latents with cone-restricted passes (True) or all
            latents with full passes (False).

    The free variables are ``(B * R, C, n)`` latents at :attr:`positions` (incremental) or
    ``(B * R, C, L, L)`` (full), row ``b * R + r`` for restart ``r`` of image ``b``.
    """

    def __init__(self, model: RGFlow, x: torch.Tensor, unknown: torch.Tensor, incremental: bool = True):
        self.model = model
        self.geometry = model.geometry
        self.incremental = bool(incremental)
        self.unknown = self.geometry.check_mask(unknown, "unknown region")
        unknown_dev = self.unknown.to(x.device)
        self.base = torch.where(unknown_dev, torch.zeros((), dtype=x.dtype, device=x.device), x.detach())
        self.backend = ops.resolve_backend(model.backend, x)
        self._unknown_dev = unknown_dev
        if self.incremental:
            self.encoder = IncrementalEncoder(model, self.base)
            self.encode_plan = self.encoder.plan(self.unknown)
            self.decode_plan = region_decode_plan(self.geometry, self.unknown, x.device)
            if not torch.equal(self.encode_plan.positions, self.decode_plan.positions):
                raise RuntimeError("internal error: inference cone and decode plan disagree")
            self.positions = self.decode_plan.positions
            self.region_slots = self.decode_plan.slots_of(self.unknown)
            self.patch_evals_per_step = self.encode_plan.patch_evals + self.decode_plan.patch_evals
            self.num_free = self.geometry.channels * len(self.positions)
        else:
            model.check_images(self.base, "x", check_finite=True)
            self.positions = None
            total = sum(s.num_patches for s in self.geometry.sublayers)
            self.patch_evals_per_step = 2 * total
            self.num_free = self.geometry.channels * self.geometry.image_size**2

    def free_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The free variables of full latents ``z (B * R, C, L, L)``."""
        return z.flatten(2)[:, :, self.positions].contiguous() if self.incremental else z.contiguous()

    def fill(self, free: torch.Tensor) -> torch.Tensor:
        """``(B * R, C, n_unknown)``: the generated values of the unknown pixels (row-major)."""
        if self.incremental:
            return decode_cone_values(self.model, self.decode_plan, free, self.region_slots, self.backend)
        return self.model.decode(free)[:, :, self._unknown_dev]

    def log_prob(self, free: torch.Tensor) -> torch.Tensor:
        """``(B * R,)`` log-density of the filled images, differentiable in ``free``."""
        if self.incremental:
            return self.encoder.evaluate(self.fill(free), self.unknown).log_prob
        repeats = free.shape[0] // self.base.shape[0]
        generated = self.model.decode(free)
        filled = torch.where(self._unknown_dev, generated, self.base.repeat_interleave(repeats, dim=0))
        return self.model.log_prob(filled)



class NonFiniteRestartsError(InputError, FloatingPointError):
    """Every restart of some image ended NaN or inf; a smaller lr or fewer steps usually helps."""


def _finite_or_worst(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN and +-inf replaced by -inf, so that argmax/topk never pick them.

    (``topk`` orders NaN above every number, ``argmax`` returns a NaN's index.)
    """
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf))

def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")


def _unknown_masks(model, x, known_mask) -> list:
    """Per-image unknown masks (bool ``(L, L)``, CPU) from ``known_mask``."""
    L = model.image_size
    B = x.shape[0]
    if not isinstance(known_mask, torch.Tensor):
        raise InputTypeError(f"known_mask must be a torch.Tensor of dtype bool, got {type(known_mask).__name__}")
    if known_mask.dtype != torch.bool:
        raise InputTypeError(f"known_mask must have dtype torch.bool (True = known pixel), got {known_mask.dtype}")
    if tuple(known_mask.shape) == (L, L):
        masks = [~known_mask.detach().cpu()] * B
    elif tuple(known_mask.shape) == (B, L, L):
        masks = list(~known_mask.detach().cpu())
    else:
        raise InputError(
            f"known_mask must have shape ({L}, {L}) or (B, {L}, {L}) = ({B}, {L}, {L}), got {tuple(known_mask.shape)}"
        )
    full = [b for b, m in enumerate(masks) if not bool(m.any())]
    if full:
        raise InputError(
            f"known_mask marks every pixel as known for image(s) {full}; expected at least one unknown (False) pixel"
        )
    return masks


def inpaint(
    model: RGFlow,
    x: torch.Tensor,
    known_mask: torch.Tensor,
    steps: int = 100,
    restarts: int = 8,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    progress: bool = False,
    incremental: bool = True,
    init_draws: int | None = None,
    temperature: Temperature = 1.0,
    full: bool = False,
    return_info: bool = False,
) -> torch.Tensor | InpaintResult:
    """Fill the unknown pixels of ``x`` by maximising the model's log-likelihood (appendix F).

    Args:
        model: an :class:`rgkern.RGFlow`.
        x: ``(B, C, L, L)`` images in model space (``rgkern.preprocess``); the values at
            unknown pixels are ignored (they may be NaN), known pixels must be finite.
        known_mask: bool ``(L, L)`` shared by the batch, or ``(B, L, L)`` per image; True
            marks a known pixel (all channels). The unknown region is ``~known_mask``.
        steps: Adam steps (>= 0). restarts: random starts optimised together (>= 1).
        lr: Adam learning rate on the latents.
        generator: ``torch.Generator`` (on ``x``'s device) for the initial draws.
        progress: show a tqdm bar over the steps.
        incremental: optimise only the latents in the inference cone of the unknown region,
            with cone-restricted decode and encode each step (the default); False is the
            all-latents, full-pass baseline.
        init_draws: random draws scored before optimising; the best ``restarts`` are kept
            (default: ``restarts``, no screening).
        temperature: prior temperature of the draws (float or one per RG level).
        full: the same as ``incremental=False``.
        return_info: return an :class:`InpaintResult` instead of the images alone.
    Returns:
        ``(B, C, L, L)`` filled images, known pixels exactly equal to ``x`` (or an
        :class:`InpaintResult` with ``return_info=True``). Images sharing an unknown region
        are optimised as one batch.
    Raises:
        TypeError: known_mask not a bool tensor; x of the wrong dtype.
        ValueError: known_mask of the wrong shape or with no unknown pixel in an image; x of
            the wrong shape or with non-finite known pixels; bad steps / restarts / lr.
    """
    model.check_images(x, "x", check_finite=False)
    masks = _unknown_masks(model, x, known_mask)
    _check_positive_int("steps", steps, 0)
    _check_positive_int("restarts", restarts, 1)
    init_draws = restarts if init_draws is None else init_draws
    _check_positive_int("init_draws", init_draws, restarts)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a positive float, got {lr!r}")
    x = x.detach()
    B, C, L, _ = x.shape
    known_values = torch.where(torch.stack(masks).to(x.device)[:, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
    if not bool(torch.isfinite(known_values).all()):
        raise InputError("x has non-finite values (NaN or inf) at known pixels; expected finite known pixels")
    incremental = incremental and not full

    groups: dict = {}
    for b, m in enumerate(masks):
        groups.setdefault(m.numpy().tobytes(), (m, []))[1].append(b)

    logdet_dtype = accumulator_dtype(x.dtype)
    images = x.clone()
    log_prob = torch.empty(B, dtype=logdet_dtype, device=x.device)
    losses = torch.empty(B, restarts, dtype=logdet_dtype, device=x.device)
    best_restart = torch.empty(B, dtype=torch.long, device=x.device)
    history = torch.empty(steps, B, restarts, dtype=logdet_dtype, device=x.device)
    free_latents = torch.empty(B, dtype=torch.long)
    patch_evals = torch.empty(B, dtype=torch.long)

    for unknown, members in groups.values():
        index = torch.tensor(members, device=x.device)
        problem = InpaintProblem(model, x[index], unknown, incremental)
        nb = len(members)
        with torch.no_grad():
            draws = model.sample_latents(nb * init_draws, temperature, generator=generator, device=x.device, dtype=x.dtype)
            free = problem.free_from_latents(draws)
            del draws
            if init_draws > restarts:
                scores = _finite_or_worst(problem.log_prob(free).view(nb, init_draws))
                keep = scores.topk(restarts, dim=1).indices + torch.arange(nb, device=x.device)[:, None] * init_draws
                free = free[keep.flatten()]
        free = free.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([free], lr=lr)
        iterator = range(steps)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"inpaint ({'cone' if incremental else 'all latents'})")
        for step in iterator:
            loss = -problem.log_prob(free)
            (grad,) = torch.autograd.grad(loss.sum(), [free])
            free.grad = grad
            optimiser.step()
            history[step, index] = loss.detach().view(nb, restarts).to(logdet_dtype)
        with torch.no_grad():
            final = _finite_or_worst(problem.log_prob(free).view(nb, restarts))
            best = final.argmax(dim=1)
            if not bool(torch.isfinite(final.gather(1, best[:, None])).all()):
                raise NonFiniteRestartsError(
                    f"every one of the {restarts} inpainting restarts of some image ended non-finite "
                    f"(lr={lr}, steps={steps}); try a smaller lr or fewer steps"
                )
            chosen = free.view(nb, restarts, *free.shape[1:])[torch.arange(nb, device=x.device), best]
            fill = problem.fill(chosen)  # (nb, C, n_unknown)
        group_images = images[index]
        group_images[:, :, unknown.to(x.device)] = fill.to(x.dtype)
        images[index] = group_images
        log_prob[index] = final.gather(1, best[:, None]).squeeze(1).to(logdet_dtype)
        losses[index] = -final.to(logdet_dtype)
        best_restart[index] = best
        free_latents[members] = problem.num_free
        patch_evals[members] = problem.patch_evals_per_step

    if not return_info:
        return images
    return InpaintResult(images, log_prob, losses, best_restart, history, free_latents, patch_evals)


# --------------------------------------------------------------------------------- evaluation helpers
def central_known_mask(image_size: int, region_size: int) -> torch.Tensor:
    """Bool ``(L, L)``: False on a ``region_size`` square at the image centre, True elsewhere."""
    if isinstance(region_size, bool) or not isinstance(region_size, int) or not 1 <= region_size <= image_size:
        raise InputError(f"region size must be an int in [1, {image_size}], got {region_size!r}")
    known = torch.ones(image_size, image_size, dtype=torch.bool)
    start = (image_size - region_size) // 2
    known[start : start + region_size, start : start + region_size] = False
    return known


def psnr(images: torch.Tensor, reference: torch.Tensor, region: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """``(B,)`` PSNR in dB of uint8 ``images`` against ``reference`` over the pixels of ``region``.

    ``region`` is bool ``(L, L)``; the MSE is over its pixels and all channels; a perfect
    match reads ``cap``.
    """
    diff = images.double()[:, :, region] - reference.double()[:, :, region]
    mse = diff.pow(2).flatten(1).mean(dim=1)
    value = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-30))
    return value.clamp(max=cap)
