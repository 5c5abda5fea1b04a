"""Compile every Triton kernel specialisation the model launches, for sm_80 and sm_90, without a GPU.

Usage: ``python scripts/compile_kernels.py [--arch 80 90] [--jobs N] [--markdown FILE]
[--save-launches FILE | --launches FILE]``.

Records the kernel launches of small models run under Triton's CPU interpreter, with the
block sizes a GPU would use (:func:`rgkern.kernels.launch.gpu_block_sizes`): encode, decode
and a training forward + backward, in float32, float64 and bfloat16 (a bfloat16 model), and a
float32 model under bfloat16 autocast (``bfloat16-autocast``: training with ``--bf16``, where
the kernels compute in bfloat16 from float32 weights), for C = 1 and 3, k = 2 and 4, L = 8 and 16
(``--sizes``: patch counts per sublayer of 1, 4 and multiples of 16, which is all a kernel
specialises on; larger L only adds launches) and batches 1, 3 and 16 (row counts of 1, not
divisible by 16, and divisible by 16). Then compiles each distinct
specialisation (:mod:`rgkern.kernels.aot`) and prints a table: registers, spills, shared
memory and compile time per specialisation and architecture, then a summary.

Exits with 1 when a compile fails or a float32/bfloat16 kernel spills; float64 spills are
reported. Triton's version decides what is checked: run it under each Triton that matters
(3.6 on the GPU machines, the newest release). Triton 3.6's interpreter cannot record the
fused half-step (its loops over runtime bounds fail under NumPy 2), so record with a newer
Triton and compile with 3.6: ``RGKERN_AOT_PYTHONPATH=/path/to/triton-3.6-site python
scripts/compile_kernels.py``. Recording the whole set took most of an hour on one core, and
compiling it about a second per specialisation: ``--save-launches FILE`` keeps the recording,
``--launches FILE`` compiles one instead of recording (e.g. once per Triton), and ``--jobs N``
compiles in N processes.
"""
import os

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: record on the CPU

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rgkern  # noqa: E402
from rgkern.core import ops  # noqa: E402
from rgkern.kernels import aot  # noqa: E402
from rgkern.kernels.launch import gpu_block_sizes, record_launches  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "bfloat16-autocast": torch.float32}
# The recordings made under autocast, and its dtype.
AUTOCAST = {"bfloat16-autocast": torch.bfloat16}
SIZES = (8, 16)
BATCHES = (1, 3, 16)


def random_model(image_size: int, channels: int, kernel_size: int, dtype: torch.dtype, device, n_mlp: int = 2) -> rgkern.RGFlow:
    """A one-block-per-sublayer model on the Triton backend whose couplings are not the identity.

    ``n_mlp`` 2 (the paper's) gives the fused half-step a hidden-to-hidden linear; 0 none.
    """
    torch.manual_seed(0)
    model = rgkern.RGFlow(image_size=image_size, channels=channels, kernel_size=kernel_size, n_layers=1, hidden=8,
                          n_res=1, n_mlp=n_mlp, backend="triton")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("s_scale", "t_scale")):
                param.normal_(0, 0.5)
    return model.to(device, dtype)


def record_passes(model: rgkern.RGFlow, batches=BATCHES, autocast: torch.dtype | None = None) -> list:
    """Distinct launches of encode, decode and a training forward + backward at each batch size
    (the fused sublayers), and of every sublayer's row path both ways with its backward (the
    stand-alone gather and scatter around ``transform_rows``, as the incremental encoder and
    decoder and inpainting run it).

    Recorded with a GPU's block sizes (:func:`~rgkern.kernels.launch.gpu_block_sizes`); the
    fused kernels in every tuning configuration; under ``autocast`` (a dtype) when given.
    """
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1)
    shape = (model.channels, model.image_size, model.image_size)
    mixed = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with record_launches() as launches, gpu_block_sizes(), mixed:
        for batch in batches:
            x = torch.randn((batch, *shape), generator=generator, dtype=torch.float64).to(device, dtype)
            with torch.no_grad():
                z, _ = model.encode(x)
                model.decode(z)
            model.zero_grad(set_to_none=True)
            model.log_prob(x).sum().backward()
            for index, sublayer in enumerate(model.sublayers):
                row_index = model.geometry.row_index(index, device)
                for inverse in (False, True):
                    image = x.detach().clone().requires_grad_(True)
                    rows, logdet = sublayer.transform_rows(ops.gather_patches(image, row_index, "triton"), inverse, "triton")
                    (ops.scatter_patches(image, rows, row_index, "triton").sum() + logdet.sum()).backward()
    return launches


def record_all(args) -> list:
    """The launches of every model of ``args.dtypes`` x C = 1, 3 x k = 2, 4 x ``args.sizes`` (:func:`record_passes`)."""
    launches = []
    for dtype_name in args.dtypes:
        for channels in (1, 3):
            for kernel_size in (2, 4):
                for size in args.sizes:
                    if size % kernel_size or size < 2 * kernel_size:
                        continue
                    for n_mlp in (2, 0) if size == min(args.sizes) else (2,):
                        model = random_model(size, channels, kernel_size, DTYPES[dtype_name], args.device, n_mlp)
                        launches.extend(record_passes(model, autocast=AUTOCAST.get(dtype_name)))
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHITECTURES), help="sm versions (80 90)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes L")
    parser.add_argument("--device", default="cpu", help="where the models run while recording (cpu: interpreter)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    recording = parser.add_mutually_exclusive_group()
    recording.add_argument("--save-launches", type=Path, metavar="FILE", help="write the recorded launches to FILE (JSON)")
    recording.add_argument("--launches", type=Path, metavar="FILE",
                           help="compile the launches in FILE (from --save-launches) instead of recording")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    start = time.perf_counter()
    launches = aot.load_launches(args.launches) if args.launches else record_all(args)
    recorded = time.perf_counter() - start
    if args.save_launches:
        aot.save_launches(launches, args.save_launches)
    print(f"{'loaded' if args.launches else 'recorded'} {len(launches)} distinct launches in {recorded:.0f} s; compiling",
          file=sys.stderr, flush=True)
    results = aot.compile_launches(launches, args.arch, progress=True, jobs=args.jobs)
    compiled = time.perf_counter() - start - recorded

    table = aot.format_results(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")

    failed = [r for r in results if not r.ok]
    narrow_spills = [r for r in results if r.ok and r.spills and "fp64" not in r.pointer_dtypes]
    wide_spills = [r for r in results if r.ok and r.spills and "fp64" in r.pointer_dtypes]
    per_kernel = collections.Counter((r.kernel, r.arch) for r in results)
    seconds = [r.seconds for r in results]
    print()
    versions = ", ".join(sorted({r.triton for r in results})) or triton.__version__
    print(f"Triton {versions}: {len(results)} specialisations compiled for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {compiled:.0f} s ({min(seconds):.2f} to {max(seconds):.2f} s each, {args.jobs} process(es)); "
          f"{'loading' if args.launches else 'recording'} took {recorded:.0f} s")
    for (kernel, arch), count in sorted(per_kernel.items()):
        group = [r for r in results if (r.kernel, r.arch) == (kernel, arch) and r.ok]
        registers = [r.registers for r in group]
        spilled = max((r.spill_stores or 0 for r in group), default=0)
        print(f"  {kernel} sm_{arch}: {count} specialisations, {min(registers, default=0)}-{max(registers, default=0)} "
              f"registers, spill stores up to {spilled} B")
    tiles = collections.defaultdict(list)  # the fused kernels per tuning configuration
    for r in results:
        if r.ok and "BLOCK_ROWS" in r.constexprs and "fp64" not in r.pointer_dtypes and r.kernel.startswith("coupling_"):
            tiles[(r.kernel, r.arch, r.constexprs["BLOCK_ROWS"], r.options.get("num_warps"), r.options.get("num_stages"))].append(r)
    for (kernel, arch, rows, warps, stages), group in sorted(tiles.items()):
        print(f"  {kernel} sm_{arch}, {rows} rows, {warps} warps, {stages} stages (float32/bfloat16): {len(group)} "
              f"specialisations, {min(r.registers for r in group)}-{max(r.registers for r in group)} registers, "
              f"{sum(r.spills for r in group)} spill")
    print(f"failed: {len(failed)}; float32/bfloat16 specialisations that spill: {len(narrow_spills)}; "
          f"float64 ones that spill: {len(wide_spills)}")
    return 1 if failed or narrow_spills else 0


if __name__ == "__main__":
    sys.exit(main())
