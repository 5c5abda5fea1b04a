"""Compile recorded kernel launches for a GPU ahead of time, on a machine with no GPU and no driver.

Not an op. The Triton interpreter runs code the compiler rejects (a loop-carried variable
whose dtype changes in the loop, an ``if`` whose branches give different dtypes), so the
CPU tests cannot tell whether the kernels compile for a GPU. This module closes that gap:

1. :func:`~rgkern.kernels.launch.record_launches` inside
   :func:`~rgkern.kernels.launch.gpu_block_sizes` records the launches of a model run under
   the interpreter (the caller does this: the kernels do not know the model);
2. :func:`specialise` turns one :class:`~rgkern.kernels.launch.Launch` into what the JIT would
   compile for a target: signature, constexprs and attributes (divisibility by 16, integers
   equal to 1 turned into constants), from the JIT's own argument binder;
3. :func:`compile_specialisation` runs Triton's whole NVIDIA pipeline (TTIR, TTGIR, LLVM IR,
   PTX, cubin through the ptxas in the triton wheel) as
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the
   registers, spills and stack frame from the ptxas log (``cuobjdump`` on the cubin where a
   Triton prints no log), the shared memory from the metadata.

:func:`compile_launches` does 2 and 3 for a list of launches. Under ``TRITON_INTERPRET`` it
runs them in a child Python without the interpreter (``python -m rgkern.kernels.aot``):
there the kernels are real ``JITFunction``\\ s, and the interpreter's patches of
``triton.language`` (it leaves some in place after a run) cannot reach the compiler. With
``jobs=n``, n such children share the work. :func:`save_launches` and :func:`load_launches`
keep a recording in a file, so that one recording is compiled under each Triton.

Works with Triton 3.6 and 3.9. :func:`specialise` uses two private pieces of the JIT
(``create_function_from_signature`` and ``JITFunction._pack_args``), the same in both, so that
the specialisation is exactly the one a launch would compile.
"""
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .launch import Launch, TensorArgument, interpreter_requested

__all__ = [
    "ARCHITECTURES",
    "Specialisation",
    "specialise",
    "CompileResult",
    "compile_specialisation",
    "compile_launches",
    "parse_ptxas_log",
    "format_results",
]

ARCHITECTURES = (80, 90)  # A100; H100/H200 (compiled as sm_90a)


@dataclasses.dataclass(frozen=True)
class _TensorStandIn:
    """What the JIT binder reads of a tensor argument: its dtype and data pointer."""

    dtype: torch.dtype
    aligned: bool

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


def _stand_in(value):
    return _TensorStandIn(value.dtype, value.aligned) if isinstance(value, TensorArgument) else value


@dataclasses.dataclass
class Specialisation:
    """One kernel as the JIT would compile it for ``sm_<arch>``: the pieces of its ``ASTSource``.

    ``kernel`` is a ``JITFunction``; ``signature`` maps every parameter name to its type
    (``"*fp32"``, ``"i32"``, ``"constexpr"``); ``constexprs`` maps parameter paths
    (``(index,)``) to values, the integers the JIT turned into constants included; ``attrs``
    maps paths to the backend's attributes (``tt.divisibility`` 16); ``options`` holds what
    the launch passed besides the arguments (``num_warps``, ``num_stages``).
    """

    kernel: object
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def arguments(self) -> str:
        """Types of the runtime parameters (``:16`` where divisible by 16) and the integers made constant.

        E.g. ``*fp32:16 x3, *i64:16, i32, n_rows=1``: ``x3`` for three such parameters in a row.
        """
        declared = set(self.kernel.constexprs)
        parts = []
        for index, (name, kind) in enumerate(self.signature.items()):
            if kind != "constexpr":
                divisible = any("divisibility" in str(attr) for attr in self.attrs.get((index,), ()))
                parts.append(kind + (":16" if divisible else ""))
            elif index not in declared:
                parts.append(f"{name}={self.constexprs[(index,)]}")
        runs = []  # "*fp32:16 x3" for three equal parameters in a row
        for part in parts:
            if runs and runs[-1][0] == part:
                runs[-1][1] += 1
            else:
                runs.append([part, 1])
        return ", ".join(part if count == 1 else f"{part} x{count}" for part, count in runs)

    def constants(self) -> dict:
        """The declared constexprs by name, e.g. ``{"DIM": 48, "BLOCK_ROWS": 32}``."""
        names = list(self.signature)
        return {names[index]: self.constexprs[(index,)] for index in self.kernel.constexprs}

    def key(self) -> str:
        """Equal for specialisations that compile to the same kernel."""
        return repr((self.name, self.arch, self.signature, sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


def specialise(launch: Launch, arch: int) -> Specialisation:
    """What ``launch`` would compile on an ``sm_<arch>`` GPU, from the JIT's own binder.

    ``launch.kernel`` must be a ``JITFunction`` (not interpreted).
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_stand_in(value) for value in launch.args]
    kwargs = {name: _stand_in(value) for name, value in launch.kwargs}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    launch_options = {name: getattr(options, name) for name, _ in launch.kwargs if name not in kernel.arg_names}
    return Specialisation(kernel, arch, signature, constexprs, attrs, launch_options)


@dataclasses.dataclass
class CompileResult:
    """What compiling one specialisation gave (plain values: it crosses processes as JSON).

    ``arguments`` and ``constexprs`` as :meth:`Specialisation.arguments` / ``constants`` give
    them, ``options`` as :attr:`Specialisation.options` (``num_warps``, ``num_stages``, ...);
    ``pointer_dtypes`` the distinct element types of the pointer parameters
    (``"fp32"``, ``"bf16"``, ``"i64"``); ``registers`` per thread; ``spill_stores`` /
    ``spill_loads`` / ``stack`` in bytes per thread (spills None where only ``cuobjdump``
    could be read: it gives the stack frame, not the spills); ``shared`` bytes of shared
    memory per program; ``seconds`` of the whole compile; ``error`` the compiler's message
    when it failed (the figures are then None); ``triton`` the version that compiled it (the
    child's, where :func:`compile_launches` compiles under another Triton).
    """

    kernel: str
    arch: int
    arguments: str
    constexprs: dict
    pointer_dtypes: list
    seconds: float
    options: dict = dataclasses.field(default_factory=dict)
    triton: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def spills(self) -> bool:
        """True when ptxas spilled (or, from ``cuobjdump`` alone, when there is a stack frame)."""
        if self.spill_stores is not None:
            return self.spill_stores + self.spill_loads > 0
        return bool(self.stack)


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores/loads and stack frame (bytes per thread) from a ``ptxas -v`` log.

    The largest figure of each where the log names several functions; {} without a
    register line.
    """
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    if not registers:
        return {}
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": max(registers),
        "stack": max((int(f[0]) for f in frames), default=0),
        "spill_stores": max((int(f[1]) for f in frames), default=0),
        "spill_loads": max((int(f[2]) for f in frames), default=0),
    }


def _cuobjdump_usage(cubin: bytes) -> dict:
    """Registers and stack frame from ``cuobjdump --dump-resource-usage`` (the one in the triton wheel)."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], check=True, capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"registers": int(registers.group(1)), "stack": int(stack.group(1))} if registers and stack else {}


def compile_specialisation(spec: Specialisation) -> CompileResult:
    """Compile ``spec`` for its architecture afresh (an empty cache) and measure it.

    A compile that fails returns the compiler's message in ``error`` rather than raising.
    """
    pointers = sorted({kind.lstrip("*k") for kind in spec.signature.values() if kind.startswith("*")})
    described = dict(kernel=spec.name, arch=spec.arch, arguments=spec.arguments(), constexprs=spec.constants(),
                     pointer_dtypes=pointers, options=dict(spec.options), triton=triton.__version__)
    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    log = io.StringIO()
    knobs = triton.knobs
    with contextlib.ExitStack() as stack:
        for group in (knobs.nvidia, knobs.cache, knobs.compilation):
            stack.enter_context(group.scope())
        knobs.nvidia.dump_ptxas_log = True  # printed to stdout, caught below
        knobs.cache.dir = stack.enter_context(tempfile.TemporaryDirectory())
        knobs.compilation.always_compile = True
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(source, target=GPUTarget("cuda", spec.arch, 32), options=dict(spec.options))
        except Exception as error:  # the compiler's exception types differ between versions
            return CompileResult(**described, seconds=time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
        seconds = time.perf_counter() - start
    usage = parse_ptxas_log(log.getvalue()) or _cuobjdump_usage(compiled.asm["cubin"])
    return CompileResult(**described, seconds=seconds, shared=compiled.metadata.shared, **usage)


# --------------------------------------------------------------------------- across processes
def _encode(value):
    if isinstance(value, TensorArgument):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.aligned}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot send a launch argument of type {type(value).__name__} to the compiler process")


def _decode(value):
    if isinstance(value, dict):
        return TensorArgument(getattr(torch, value["tensor"]), value["aligned"])
    return value


def _launch_to_json(launch: Launch) -> dict:
    fn = launch.kernel.fn
    return {
        "module": fn.__module__,
        "name": fn.__qualname__,
        "args": [_encode(v) for v in launch.args],
        "kwargs": [[k, _encode(v)] for k, v in launch.kwargs],
    }


def _interpreted(kernel) -> bool:
    """True for a kernel bound under ``TRITON_INTERPRET`` (it cannot be compiled in this process)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _launch_from_json(entry: dict) -> Launch:
    kernel = getattr(importlib.import_module(entry["module"]), entry["name"], None)
    if not (hasattr(kernel, "params") or _interpreted(kernel)):
        raise TypeError(f"{entry['module']}.{entry['name']} is not a @triton.jit kernel: the compiler process imports "
                        "each kernel by the name of its function, at the top level of its module")
    return Launch(kernel, tuple(_decode(v) for v in entry["args"]), tuple((k, _decode(v)) for k, v in entry["kwargs"]))


def _compile_here(launches, architectures, progress, share: tuple[int, int] = (0, 1)) -> list[CompileResult]:
    """Compile the distinct specialisations in first-launch order; ``share`` ``(i, n)``: only
    every n-th from the i-th (one of n processes working together)."""
    specs = {}
    for arch in architectures:
        for launch in launches:
            spec = specialise(launch, arch)
            specs.setdefault(spec.key(), spec)
    part, parts = share
    mine = list(specs.values())[part::parts]
    results = []
    for number, spec in enumerate(mine, 1):
        results.append(compile_specialisation(spec))
        if progress:
            result = results[-1]
            where = f"{number}/{len(mine)}" + (f" of part {part + 1}/{parts}" if parts > 1 else "")
            print(f"[{where}] sm_{spec.arch} {spec.name}: "
                  f"{'ok' if result.ok else 'FAILED'} {result.seconds:.2f} s", file=sys.stderr, flush=True)
    return results


def compile_launches(launches: Iterable[Launch], architectures: Sequence[int] = ARCHITECTURES, progress: bool = False,
                     jobs: int = 1) -> list[CompileResult]:
    """Compile the distinct specialisations of ``launches`` for each architecture, in first-launch order.

    Under ``TRITON_INTERPRET`` (interpreted kernels), or with ``jobs`` > 1, the work runs in
    ``jobs`` child Pythons without the interpreter, which import each kernel by its module and
    name; the modules must be importable there (the children get this process's
    ``sys.path``, after the folders in ``RGKERN_AOT_PYTHONPATH`` when that is set: so
    launches recorded under one Triton's interpreter can be compiled by another Triton, e.g.
    the 3.6 of the GPU machines, whose interpreter cannot run kernels that loop over a
    runtime bound with NumPy 2). ``progress`` prints a line per compile to stderr.
    """
    launches = list(launches)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    interpreted = interpreter_requested() or any(_interpreted(launch.kernel) for launch in launches)
    if jobs == 1 and not interpreted:
        return _compile_here(launches, architectures, progress)
    with tempfile.TemporaryDirectory() as folder:
        request = os.path.join(folder, "launches.json")
        save_launches(launches, request)
        paths = os.environ.get("RGKERN_AOT_PYTHONPATH", "").split(os.pathsep) + sys.path
        environment = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in paths if p))
        answers = [os.path.join(folder, f"results{part}.json") for part in range(jobs)]
        children = [
            subprocess.Popen([sys.executable, "-m", __name__, request, answers[part], ",".join(map(str, architectures)),
                              str(part), str(jobs), "1" if progress else "0"], env=environment)
            for part in range(jobs)
        ]
        codes = [child.wait() for child in children]
        if any(codes):
            raise RuntimeError(f"an ahead-of-time compiler process failed (exit codes {codes})")
        parts = []
        for answer in answers:
            with open(answer) as file:
                parts.append([CompileResult(**entry) for entry in json.load(file)])
    # Part i holds specialisations i, i + jobs, ...: interleave them back into first-launch order.
    return [result for group in itertools.zip_longest(*parts) for result in group if result is not None]


def save_launches(launches: Iterable[Launch], path: str | os.PathLike) -> None:
    """Write ``launches`` to a JSON file that :func:`load_launches` reads (record once, compile under each Triton)."""
    with open(path, "w") as file:
        json.dump([_launch_to_json(launch) for launch in launches], file)


def load_launches(path: str | os.PathLike) -> list[Launch]:
    """The launches :func:`save_launches` wrote, bound to this process's kernels."""
    with open(path) as file:
        return [_launch_from_json(entry) for entry in json.load(file)]


def _main(request: str, answer: str, architectures: str, part: str, parts: str, progress: str) -> None:
    launches = load_launches(request)
    results = _compile_here(launches, [int(a) for a in architectures.split(",")], progress == "1", (int(part), int(parts)))
    with open(answer, "w") as file:
        json.dump([dataclasses.asdict(result) for result in results], file)


def format_results(results: Iterable[CompileResult]) -> str:
    """A Markdown table of ``results``: one row per specialisation and architecture."""

    def cell(value):
        return "?" if value is None else str(value)

    lines = [
        "| kernel | sm | arguments | constexprs | registers | spill stores / loads (B) | shared (B) | compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        constants = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        if r.ok:
            figures = f"{cell(r.registers)} | {cell(r.spill_stores)} / {cell(r.spill_loads)} | {cell(r.shared)}"
        else:
            figures = f"FAILED: {r.error.splitlines()[0][:80]} | | "
        lines.append(f"| {r.kernel} | {r.arch} | {r.arguments} | {constants} | {figures} | {r.seconds:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _main(*sys.argv[1:])
