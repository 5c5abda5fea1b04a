"""The tools layer: what is built on the model for training and looking at it.

``train`` (presets, the trainer), ``sampling``, ``explain``, ``checkpoint``,
``distributed`` (torchrun / DDP) and ``plots``.

Imports :mod:`rgkern.core`, :mod:`rgkern.locality` and :mod:`rgkern.data`; never the
command line.
"""
