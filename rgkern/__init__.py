"""rgkern: a kernel-accelerated RG-Flow (Hu, Wu, You, Olshausen, Chen).

    model = rgkern.RGFlow(image_size=32, channels=3)   # DESIGN.md section 6
    z, logdet = model.encode(x)

Submodules: ``geometry`` (index tables, levels, cones), ``reference`` / ``ops`` /
``triton_ops`` (the per-sublayer ops and their backends), ``model``, ``priors``,
``preprocess``, ``checkpoint``, ``data``, ``train``, ``sampling``, ``plots``,
``incremental``, ``inpaint`` (the module; ``rgkern.inpaint`` here is its function),
``explain`` and ``cli``. The Triton kernels install as ``rgkern.kernels``.
"""
from .core.geometry import Geometry, get_geometry
from .core.model import RGFlow
from .core.preprocess import bits_per_dim, postprocess, preprocess
from .core.priors import GaussianPrior, LaplacePrior
from .locality.incremental import IncrementalDecoder, IncrementalEncoder
from .locality.inpaint import InpaintResult, inpaint
from .tools.explain import (
    mixed_temperature_grid,
    progressive_generation,
    receptive_field,
    receptive_fields_per_level,
    scale_mix,
    traverse,
)

__version__ = "0.1.0"

__all__ = [
    "RGFlow",
    "Geometry",
    "get_geometry",
    "preprocess",
    "postprocess",
    "bits_per_dim",
    "LaplacePrior",
    "GaussianPrior",
    "IncrementalEncoder",
    "IncrementalDecoder",
    "inpaint",
    "InpaintResult",
    "receptive_field",
    "receptive_fields_per_level",
    "traverse",
    "mixed_temperature_grid",
    "scale_mix",
    "progressive_generation",
]
