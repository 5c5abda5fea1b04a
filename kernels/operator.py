"""``torch.library`` operators of the kernel ops: one registration rule, one way to call them.

Each op's ``function.py`` wraps its host functions (forward and backward) as :class:`Operator`\\ s
in the ``rgkern`` namespace (``torch.ops.rgkern.<name>``). Where the installed torch has
``torch.library.triton_op`` and the kernels are compiled (not interpreted), an operator is a
``triton_op``: ``torch.compile`` sees and can inline its Triton kernels. Under Triton's CPU
interpreter (``triton_op`` cannot trace interpreted kernels) it is an opaque ``custom_op``
with a fake (shape) function. Calling an :class:`Operator` runs the registered operator
while ``torch.compile`` traces and the host function directly otherwise (no dispatcher
overhead); both run the same code. The operators are not differentiable by themselves: the
autograd Functions beside them are.
"""
import inspect
from typing import Callable, Sequence

import torch

from .runtime import interpreter_requested

__all__ = ["NAMESPACE", "REGISTRATION", "Operator"]

NAMESPACE = "rgkern"

#: How each operator was registered: ``"triton_op"``, ``"custom_op"`` or ``"unregistered: why"``.
REGISTRATION: dict = {}


def _with_signature(host: Callable, parameters: Sequence[tuple], returns) -> Callable:
    """``host`` behind a signature of annotated ``parameters`` (``(name, type)``), from which
    ``torch.library`` infers the operator's schema; the arguments reach ``host`` by position."""
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind) for name, kind in parameters],
        return_annotation=returns,
    )

    def body(*args, **kwargs):
        return host(*signature.bind(*args, **kwargs).args)

    body.__signature__ = signature
    body.__name__ = body.__qualname__ = host.__name__
    return body


class Operator:
    """The operator ``rgkern::name`` of the host function ``host`` (see the module docstring).

    ``parameters``: ``(name, annotation)`` of each argument, in order; ``returns``: the return
    annotation; ``fake``: the shape function (arguments as ``host``'s) for the ``custom_op``
    registration. ``how`` says how it was registered (also in :data:`REGISTRATION`).
    """

    def __init__(self, name: str, host: Callable, parameters: Sequence[tuple], returns: object, fake: Callable):
        self.name = name
        self.host = host
        self.registered = None
        body = _with_signature(host, parameters, returns)
        qualified = f"{NAMESPACE}::{name}"
        library = torch.library
        try:
            if not interpreter_requested() and hasattr(library, "triton_op") and hasattr(library, "wrap_triton"):
                self.how, self.registered = "triton_op", library.triton_op(qualified, body, mutates_args=())
            elif hasattr(library, "custom_op"):
                self.registered = library.custom_op(qualified, body, mutates_args=())
                self.registered.register_fake(fake)
                self.how = "custom_op"
            else:
                self.how = "unregistered: this torch has neither torch.library.triton_op nor custom_op"
        except Exception as error:  # e.g. registered twice after importlib.reload
            self.how, self.registered = f"unregistered: {type(error).__name__}: {error}", None
        REGISTRATION[name] = self.how

    def __call__(self, *args):
        """The registered operator while ``torch.compile`` traces, the host function otherwise."""
        if self.registered is not None and torch.compiler.is_compiling():
            return self.registered(*args)
        return self.host(*args)
