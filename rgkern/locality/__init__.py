"""The locality layer: work restricted to inference and generation cones.

``plans`` (the dirty-patch schedule of a local change, run on a compact state),
``incremental`` (encoders and decoders that cache every sublayer's input and recompute
only dirty patches), ``region`` (generating only the pixels of a region) and ``inpaint``
(appendix F inpainting over the latents of a region's inference cone).

Imports only :mod:`rgkern.core` (and itself).
"""
