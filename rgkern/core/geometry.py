"""Patch geometry of RG-Flow: index tables, RG levels and causal cones.

Everything here is index arithmetic on plain tensors (no ``nn.Module``), computed once
per ``(image_size, kernel_size, channels)`` and shared by the reference path, the Triton
kernels, the incremental encoder and the explainability tools.

Conventions (docs/design.md section 1, paper eq. 6-9):

* ``L = k * 2**n``; levels ``h = 0 .. H-1`` with ``H = log2(L / k) + 1``.
* In the x -> z direction every level applies two sublayers: the disentangler (offset
  ``k * 2**h / 2``) and the decimator (offset 0). With ``order="paper"`` (eq. 6-9) the
  disentangler comes first: sublayer ``s = 2*h`` is the disentangler of level ``h``,
  ``s = 2*h + 1`` its decimator. With ``order="authors"`` (the authors' published code,
  docs/design.md section 8) the decimator comes first. Everything that depends on the order
  (cones, plans, the incremental encoder) reads it from :attr:`Geometry.sublayers`.
* A patch ``(p, q)`` of a sublayer with offset ``o``, dilation ``d = 2**h`` and stride
  ``k * d`` holds the pixels at rows ``(p*k*d + a*d + o) mod L`` and columns
  ``(q*k*d + b*d + o) mod L`` for ``a, b = 0 .. k-1``. Patches are numbered ``p*n + q``
  (``n`` patches per side), pixels within a patch ``a*k + b``.
* A patch row fed to the coupling networks is the vector of ``D = C*k*k`` values ordered
  ``(channel, a, b)``; its checkerboard mask is the same for every channel.
* A pixel ``(i, j)`` is last touched at level ``min(v2(i), v2(j), H-1)``: its latent's RG
  level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .cache import BoundedCache
from .errors import InputError, InputTypeError

__all__ = ["SublayerGeometry", "Geometry", "get_geometry", "check_image_size", "num_levels", "SUBLAYER_ORDERS"]

DISENTANGLER = "disentangler"
DECIMATOR = "decimator"

#: The two sublayers of a level, in x -> z order, for each ordering convention.
SUBLAYER_ORDERS = {"paper": (DISENTANGLER, DECIMATOR), "authors": (DECIMATOR, DISENTANGLER)}
# Cache sizes (rgkern.core.cache): shared geometries, and per geometry its device tables and cones.
GEOMETRY_CACHE_SIZE = 64
TABLE_CACHE_SIZE = 256


def check_order(order: str) -> str:
    if order not in SUBLAYER_ORDERS:
        raise InputError(f"unknown sublayer order {order!r}; expected one of {tuple(SUBLAYER_ORDERS)}")
    return order


def check_image_size(image_size: int, kernel_size: int) -> int:
    """Validate ``image_size = kernel_size * 2**n`` and return the number of levels H."""
    for name, value in (("image_size", image_size), ("kernel_size", kernel_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    if kernel_size < 2 or kernel_size % 2:
        raise InputError(f"kernel_size must be an even integer >= 2, got {kernel_size}")
    ratio = image_size // kernel_size
    if image_size % kernel_size or ratio & (ratio - 1):
        raise InputError(
            f"image size {image_size} is not kernel_size * 2**n for kernel_size={kernel_size}; "
            f"expected one of {[kernel_size * 2**n for n in range(7)]}, ..."
        )
    return int(math.log2(ratio)) + 1


def num_levels(image_size: int, kernel_size: int) -> int:
    """Number of RG levels ``H = log2(L / k) + 1``."""
    return check_image_size(image_size, kernel_size)


@dataclass(frozen=True)
class SublayerGeometry:
    """Where one sublayer (disentangler or decimator of one level) acts.

    ``pixel_index`` is a LongTensor ``(P, k*k)`` of flat pixel indices ``i*L + j`` on the
    CPU; :meth:`Geometry.pixel_index` and :meth:`Geometry.row_index` give device copies.
    """

    index: int
    level: int
    kind: str
    offset: int
    dilation: int
    stride: int
    patches_per_side: int
    pixel_index: torch.Tensor = field(repr=False)

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def name(self) -> str:
        return f"{self.kind}({self.level})"


def _v2(values: torch.Tensor, cap: int) -> torch.Tensor:
    """2-adic valuation of each value, capped at ``cap`` (``v2(0) = cap``)."""
    out = torch.zeros_like(values)
    for e in range(1, cap + 1):
        out += (values % (2**e) == 0).long()
    return out


class Geometry:
    """Index tables of an RG-Flow on ``(C, L, L)`` images with ``k x k`` patches.

    Use :func:`get_geometry` to get the shared, cached instance.

    Attributes:
        image_size (L), kernel_size (k), channels (C), num_levels (H), patch_dim (D = C*k*k)
        order: ``"paper"`` or ``"authors"``, which sublayer of a level comes first.
        sublayers: list of :class:`SublayerGeometry` in x -> z order (length 2H).
        levels: LongTensor ``(L, L)``, RG level of the latent at each pixel position.
        latent_counts: list of H ints, latents (values, channels included) per level.
        mask: float64 tensor ``(D,)``, the checkerboard mask (1 on the conditioning half).
    """

    def __init__(self, image_size: int, kernel_size: int, channels: int, order: str = "paper"):
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise InputError(f"channels must be a positive int, got {channels!r}")
        self.order = check_order(order)
        self.num_levels = check_image_size(image_size, kernel_size)
        self.image_size = L = image_size
        self.kernel_size = k = kernel_size
        self.channels = channels
        self.patch_dim = channels * k * k

        self.sublayers: list[SublayerGeometry] = []
        a = torch.arange(k)
        for h in range(self.num_levels):
            dilation = 2**h
            stride = k * dilation
            n = L // stride
            p = torch.arange(n)
            for kind in SUBLAYER_ORDERS[order]:
                offset = stride // 2 if kind == DISENTANGLER else 0
                # rows[p, a] and cols[q, b] of every patch pixel, with periodic wrap.
                lines = (p[:, None] * stride + a[None, :] * dilation + offset) % L  # (n, k)
                rows = lines[:, None, :, None].expand(n, n, k, k)
                cols = lines[None, :, None, :].expand(n, n, k, k)
                pixel_index = (rows * L + cols).reshape(n * n, k * k).contiguous()
                self.sublayers.append(
                    SublayerGeometry(len(self.sublayers), h, kind, offset, dilation, stride, n, pixel_index)
                )

        coords = torch.arange(L)
        v2 = _v2(coords, self.num_levels - 1)
        self.levels = torch.minimum(v2[:, None], v2[None, :])
        self.latent_counts = [int((self.levels == h).sum()) * channels for h in range(self.num_levels)]

        ab = torch.arange(k)
        checker = ((ab[:, None] + ab[None, :]) % 2 == 0).to(torch.float64).flatten()
        self.mask = checker.repeat(channels)

        self._device_cache = BoundedCache(TABLE_CACHE_SIZE)
        self._cone_cache = BoundedCache(TABLE_CACHE_SIZE)

    def __repr__(self) -> str:
        return (
            f"Geometry(image_size={self.image_size}, kernel_size={self.kernel_size}, "
            f"channels={self.channels}, num_levels={self.num_levels}, order={self.order!r})"
        )

    # ----------------------------------------------------------------- device tables
    def _cached(self, key, device, build):
        device = torch.device(device)
        full_key = (key, str(device))
        table = self._device_cache.get(full_key)
        if table is None:
            # Built outside inference mode, or a table first made while sampling could not be
            # used later in a pass that autograd records.
            with torch.inference_mode(False):
                table = build().to(device)
            self._device_cache[full_key] = table
        return table

    def pixel_index(self, sublayer: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """LongTensor ``(P, k*k)``: flat pixel index ``i*L + j`` of each patch pixel."""
        return self._cached(("pixel", sublayer), device, lambda: self.sublayers[sublayer].pixel_index)

    def row_index(self, sublayer: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """LongTensor ``(P, D)``: flat index into a ``(C, L, L)`` image of each row entry.

        Row entry ``c*k*k + a*k + b`` of patch ``p`` is image element
        ``c*L*L + pixel_index[p, a*k + b]``.
        """

        def build():
            pix = self.sublayers[sublayer].pixel_index
            plane = self.image_size**2
            chan = torch.arange(self.channels)[None, :, None] * plane
            return (chan + pix[:, None, :]).reshape(pix.shape[0], self.patch_dim).contiguous()

        return self._cached(("row", sublayer), device, build)

    def checkerboard_order(self, device: torch.device | str = "cpu", inverse: bool = False) -> torch.Tensor:
        """LongTensor ``(D,)``: the row entries with the mask's conditioning half first.

        ``rows[:, order]`` holds the ``D/2`` entries where :meth:`coupling_mask` is 1 (in row
        order), then the ``D/2`` where it is 0, so that each half-step's conditioning and
        updated entries are two contiguous halves (the first or the second, by ``flipped``).
        With ``inverse`` the permutation back: ``rows[:, order][:, inverse_order] == rows``.
        """
        def build():
            order = torch.argsort(1 - self.mask, stable=True)  # the ones, then the zeros, each in row order
            return torch.argsort(order) if inverse else order

        return self._cached(("checkerboard", inverse), device, build)

    def checkerboard_row_index(self, sublayer: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """:meth:`row_index` with its entries in :meth:`checkerboard_order`: gathering with it
        gives the rows already split into the two coupling halves."""
        return self._cached(
            ("row_checkerboard", sublayer), device, lambda: self.row_index(sublayer)[:, self.checkerboard_order()].contiguous()
        )

    def coupling_mask(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      flipped: bool = False) -> torch.Tensor:
        """Checkerboard mask ``(D,)`` of a coupling half-step (1 = conditioning half).

        The first half-step of an RNVP block uses ``flipped=False``, the second ``True``.
        """
        return self._cached(
            ("mask", dtype, flipped), device, lambda: (1 - self.mask if flipped else self.mask).to(dtype)
        )

    def latent_level_of_elements(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """LongTensor ``(C, L, L)``: RG level of each latent value (``levels`` per channel)."""
        return self._cached(
            ("levels_c",), device, lambda: self.levels.expand(self.channels, -1, -1).contiguous()
        )

    # ----------------------------------------------------------------- causal cones
    def check_mask(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        """``mask`` (bool ``(L, L)``) detached on the CPU; ``TypeError``/``ValueError`` naming ``name`` otherwise."""
        if not isinstance(mask, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise InputTypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
        L = self.image_size
        if tuple(mask.shape) != (L, L):
            raise InputError(f"{name} must have shape ({L}, {L}), got {tuple(mask.shape)}")
        return mask.detach().cpu()

    def _propagate(self, mask: torch.Tensor, order) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dirty = mask.flatten().clone()
        patches = []
        for s in order:
            pix = self.sublayers[s].pixel_index
            hit = dirty[pix].any(dim=1)
            dirty_patches = hit.nonzero().flatten()
            dirty[pix[dirty_patches].flatten()] = True
            patches.append(dirty_patches)
        return dirty.view_as(mask), patches

    def _cone(self, mask: torch.Tensor, direction: str):
        key = (direction, mask.numpy().tobytes())
        hit = self._cone_cache.get(key)
        if hit is None:
            n = len(self.sublayers)
            order = range(n) if direction == "inference" else range(n - 1, -1, -1)
            cone, patches = self._propagate(mask, order)
            if direction == "generation":
                patches = patches[::-1]
            hit = self._cone_cache[key] = (cone, patches)
        return hit

    def inference_cone(self, region: torch.Tensor) -> torch.Tensor:
        """Latent positions a change of the pixels in ``region`` can reach.

        Args:
            region: bool ``(L, L)``, True where pixels change.
        Returns:
            bool ``(L, L)`` on the CPU: True at every latent position in the inference cone.
        """
        return self._cone(self.check_mask(region, "region"), "inference")[0].clone()

    def inference_patches(self, region: torch.Tensor) -> list[torch.Tensor]:
        """Dirty patch indices (LongTensor, CPU) of each sublayer, x -> z order, for ``region``."""
        return list(self._cone(self.check_mask(region, "region"), "inference")[1])

    def generation_cone(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels a change of the latents at positions ``latents`` can reach.

        Args:
            latents: bool ``(L, L)``, True at latent positions that change.
        Returns:
            bool ``(L, L)`` on the CPU: True at every pixel in the generation cone.
        """
        return self._cone(self.check_mask(latents, "latents"), "generation")[0].clone()

    def generation_patches(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Dirty patch indices of each sublayer (x -> z order of sublayers) for a latent change."""
        return list(self._cone(self.check_mask(latents, "latents"), "generation")[1])


def get_geometry(image_size: int, kernel_size: int = 4, channels: int = 3, order: str = "paper") -> Geometry:
    """The shared :class:`Geometry` of ``(image_size, kernel_size, channels, order)``."""
    return _shared_geometry(image_size, kernel_size, channels, order)


_GEOMETRIES = BoundedCache(GEOMETRY_CACHE_SIZE)


def _shared_geometry(image_size, kernel_size, channels, order) -> Geometry:
    # Called with positional arguments only, so that one geometry has one cache entry.
    key = (image_size, kernel_size, channels, order)
    return _GEOMETRIES.get_or_make(key, lambda: Geometry(*key))


get_geometry.cache_clear = _GEOMETRIES.clear
