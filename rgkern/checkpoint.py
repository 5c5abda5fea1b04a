"""``rgkern.checkpoint``: the checkpoint API of docs/design.md section 6, in one place.

rgkern's own checkpoints (:mod:`rgkern.tools.checkpoint`, including the models shipped in
``rgkern/pretrained/``, ``load_pretrained("msds1-cpu")`` or ``"pretrained:msds1-cpu"`` as a
path) and the authors' ``.state`` files
(:mod:`rgkern.tools.authors_checkpoint`). A facade: the code lives in those modules.
"""
from .tools.authors_checkpoint import AuthorsCheckpointError, authors_state_dict, convert_authors_state_dict, load_authors_checkpoint
from .tools.checkpoint import CheckpointError, load_checkpoint, load_model, load_pretrained, pretrained_names, save_checkpoint

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "pretrained_names",
    "CheckpointError",
    "load_authors_checkpoint",
    "authors_state_dict",
    "convert_authors_state_dict",
    "AuthorsCheckpointError",
]
