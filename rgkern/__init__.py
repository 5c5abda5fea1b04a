"""rgkern: a kernel-accelerated RG-Flow (Hu, Wu, You, Olshausen, Chen).

    model = rgkern.RGFlow(image_size=32, channels=3)   # see DESIGN.md section 6
    z, logdet = model.encode(x)
"""
from .geometry import Geometry, get_geometry
from .model import RGFlow
from .preprocess import bits_per_dim, postprocess, preprocess
from .priors import GaussianPrior, LaplacePrior

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
]
