"""The model layer: index geometry, the per-sublayer ops and their backends, the RG-Flow model.

``geometry`` (index tables, RG levels, cones), ``reference`` (pure-PyTorch ops),
``functions`` (the autograd Functions over the Triton kernels of :mod:`rgkern.kernels`,
and their torch.library registration), ``ops`` (backend dispatch), ``model`` (``RGFlow``),
``sublayer`` (its disentanglers and decimators), ``networks`` (their stacked ``s`` and
``t`` networks), ``priors``, ``preprocess`` (8-bit images <-> model space), ``precision``
(the accumulator dtype rule) and ``errors`` (the exception types for input a user can fix).

Imports only :mod:`rgkern.kernels` and itself; nothing in here imports a higher layer.
"""
