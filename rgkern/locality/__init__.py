"""The locality layer: work restricted to inference and generation cones.

``incremental`` (encoders and decoders that cache every sublayer's input and recompute
only dirty patches, and the cone plans they run) and ``inpaint`` (appendix F inpainting
over the latents of a region's inference cone).

Imports only :mod:`rgkern.core` (and itself).
"""
