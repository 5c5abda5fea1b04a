"""rgkern: a kernel-accelerated RG-Flow (Hu, Wu, You, Olshausen, Chen).

    model = rgkern.RGFlow(image_size=32, channels=3)   # docs/design.md section 6
    z, logdet = model.encode(x)

Subpackages, one layer each, each importing only the layers below it (README, "Layout"):
``kernels`` (the Triton kernels and their launchers, installed from the top-level folder
``kernels/``; of rgkern they use only ``core.precision``), ``core`` (geometry, reference
ops, autograd Functions, backend dispatch, the model, priors, preprocessing, errors),
``locality`` (cone plans, incremental passes, region decoding, inpainting), ``tools``
(presets, training, compile, sampling, explainability, checkpoints, distributed, plots,
the MSDS quality score)
and ``cli`` (the command line). ``data`` (the datasets) is a leaf that tools and cli use;
of rgkern it imports only ``core.errors``. This module re-exports the public API;
``rgkern.inpaint`` here is the function (the module is ``rgkern.locality.inpaint``).
"""
from . import checkpoint as checkpoint  # rgkern.checkpoint.load_authors_checkpoint etc. (docs/design.md section 6)
from .core.geometry import Geometry, get_geometry
from .core.model import RGFlow
from .core.preprocess import bits_per_dim, postprocess, preprocess
from .core.priors import GaussianPrior, LaplacePrior
from .locality.incremental import IncrementalDecoder, IncrementalEncoder
from .locality.inpaint import InpaintResult, inpaint
from .tools.authors_checkpoint import authors_state_dict, load_authors_checkpoint
from .tools.checkpoint import load_model
from .tools.explain import (
    mixed_temperature_grid,
    progressive_generation,
    receptive_field,
    receptive_fields_per_level,
    scale_mix,
    traverse,
)
from .tools.quality import msds_quality

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
    "msds_quality",
    "load_model",
    "load_authors_checkpoint",
    "authors_state_dict",
]
