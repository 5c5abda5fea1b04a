"""The tools layer: what is built on the model for training and looking at it.

``presets`` (training presets and ``TrainConfig``), ``train`` (a training run in its folder),
``trainer`` (the ``Trainer``: steps, checkpoints, resume), ``evaluation`` (held-out bits/dim
and the quality score during training),
``compile`` (the ``torch.compile`` helper training and sampling share), ``sampling``,
``explain``, ``checkpoint``, ``files`` (atomic writes, run-folder locks), ``distributed``
(torchrun / DDP), ``plots`` and ``quality`` (the MSDS quality score of images).

Imports :mod:`rgkern.core`, :mod:`rgkern.locality` and :mod:`rgkern.data`; never the
command line.
"""
