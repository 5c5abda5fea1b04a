#!/usr/bin/env bash
# One-shot GPU run on a bare machine (no network): install, test on CUDA, benchmark, summarise.
#
#   bash bench/gpu_run.sh                 # results in ./bench_out (or $OUT when set)
#
# Environment knobs:
#   OUT=dir                          where logs, bench.json and summary.md go (default ./bench_out)
#   SKIP_TESTS=1                     skip the test suite (benchmarks only)
#   RGKERN_BENCH_COMPILE=0           skip the torch.compile variants (their compile takes minutes)
#   RGKERN_BENCH_COMPILE_KERNELS=1   also benchmark the kernel path under torch.compile
#   RGKERN_BENCH_BATCH=64            batch size of the whole-model benchmarks and of bench_speed's train_step
#   LARGE_BATCH=512                  then bench_speed's train_step again at this batch (0: skip)
#   RGKERN_BENCH_SAMPLE_SIZES=64,256,1024,4096,16384   bench_speed's sampling batch sizes
#   BENCH_ARGS="-k encode"           extra pytest arguments for the benchmark run
#   TRAIN_MINUTES=0                  > 0: afterwards train the paper-msds preset for that many minutes
#                                    and print its held-out bits/dim (the paper: 0.906 after 500 epochs)
#   TRAIN_ARGS="--bf16"              extra `rgkern train` options for that run (e.g. "--bf16 --compile")
#   DATA_CACHE=./data_cache          where the generated MSDS1 arrays are cached (kept out of $OUT)
#   KEEP_CHECKPOINT=1                keep that run's checkpoint (removed by default: ~2 GB)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the real compiler, not the CPU interpreter
status=0

pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
    echo "pip install failed, see $OUT/install.log"; status=1; }

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
    python - <<'EOF'
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print(f"cuda available: {torch.cuda.is_available()}",
      f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
EOF
} | tee "$OUT/environment.txt"

if [ "${SKIP_TESTS:-0}" != "1" ]; then
    python -m pytest tests/ -x -q 2>&1 | tee "$OUT/tests.log"
    tests_status=${PIPESTATUS[0]}
    echo "tests exit status: $tests_status" | tee -a "$OUT/tests.log"
    [ "$tests_status" -eq 0 ] || status=1
fi

# shellcheck disable=SC2086
python -m pytest bench/ --benchmark-only -q --benchmark-json="$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -eq 0 ] || status=1

if [ "${LARGE_BATCH:-512}" != "0" ]; then
    RGKERN_BENCH_BATCH="${LARGE_BATCH:-512}" python -m pytest bench/bench_speed.py --benchmark-only -q -k train_step \
        --benchmark-json="$OUT/bench_batch${LARGE_BATCH:-512}.json" 2>&1 | tee "$OUT/bench_large_batch.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "${TRAIN_MINUTES:-0}" != "0" ]; then
    # Train the paper's MSDS model (appendix B) for a time budget; --time-limit stops at a step
    # boundary, evaluates on all 10,000 held-out images and checkpoints there.
    # shellcheck disable=SC2086
    python -m rgkern train --preset paper-msds --data msds1 --data-root "${DATA_CACHE:-./data_cache}" \
        --out "$OUT/paper-msds" --overwrite --no-progress --time-limit "$TRAIN_MINUTES" \
        --num-samples 64 ${TRAIN_ARGS:---bf16} 2>&1 | tee "$OUT/train.log"
    train_status=${PIPESTATUS[0]}
    [ "$train_status" -eq 0 ] || status=1
    # The checkpoint is ~2 GB with the AdamW state: too large to bring back from a lent machine.
    [ "${KEEP_CHECKPOINT:-0}" = "1" ] || rm -f "$OUT/paper-msds/model.safetensors"
    echo "paper-msds after $TRAIN_MINUTES minutes: $(grep -o 'final held-out bits/dim: [0-9.]*' "$OUT/train.log" || echo 'no result') (paper, MSDS1 after 500 epochs: 0.906)" | tee -a "$OUT/train.log"
fi

OUT="$OUT" python - <<'EOF' | tee "$OUT/summary.md"
"""Markdown summary of bench.json: per group, each path's median time, ratio and extra_info."""
import json, os, sys

import glob

path = os.path.join(os.environ["OUT"], "bench.json")
if not os.path.exists(path):
    sys.exit(f"no {path}: the benchmark run produced nothing")
data = json.load(open(path))
for extra in sorted(glob.glob(os.path.join(os.environ["OUT"], "bench_batch*.json"))):
    batch = extra.rsplit("bench_batch", 1)[1].split(".")[0]
    for bench in json.load(open(extra))["benchmarks"]:
        bench["group"] = f"{bench['group']} (batch {batch})"
        data["benchmarks"].append(bench)
print(f"# Benchmark summary ({data.get('datetime', '?')})\n")
machine = data.get("machine_info", {})
print(f"machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}\n")
first = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
print(f"device: {first.get('device', '?')}")
if "machine_copy_bytes_per_s" in first:
    print(
        f"measured in the same session: copy {first['machine_copy_bytes_per_s'] / 1e9:.0f} GB/s, "
        f"fp32 matmul {first['machine_matmul_fp32_flop_per_s'] / 1e12:.1f} TFLOP/s "
        f"(TF32 allowed: {first.get('machine_tf32_matmul_allowed')}), "
        f"bf16 matmul {first['machine_matmul_bf16_flop_per_s'] / 1e12:.1f} TFLOP/s"
    )
print()
groups = {}
for bench in data["benchmarks"]:
    groups.setdefault(bench["group"], []).append(bench)
for group, benches in groups.items():
    reference = next((b for b in benches if "[reference" in b["name"] and "compiled" not in b["name"]), benches[0])
    print(f"## {group}\n")
    print("| benchmark | median ms | vs reference | images/s | GB/s | frac copy BW | TFLOP/s | frac fp32 mm | frac bf16 mm | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b in benches:
        info = b.get("extra_info", {})
        median = b["stats"]["median"]
        fmt = lambda key, spec: format(info[key], spec) if key in info else "-"  # noqa: E731
        print(
            f"| {b['name']} | {median * 1e3:.3f} | {reference['stats']['median'] / median:.2f}x | "
            f"{fmt('images_per_s', '.1f')} | {fmt('gb_per_s', '.1f')} | {fmt('fraction_of_copy_bandwidth', '.2f')} | "
            f"{fmt('tflop_per_s', '.2f')} | {fmt('fraction_of_matmul_fp32', '.2f')} | {fmt('fraction_of_matmul_bf16', '.3f')} | "
            f"{format(info['peak_memory_bytes'] / 2**30, '.2f') if 'peak_memory_bytes' in info else '-'} |"
        )
    print()
print("'vs reference' = reference eager median / this median (>1: faster than the reference).")
EOF

echo "results in $OUT (environment.txt, tests.log, bench.log, bench.json, summary.md, train.log); exit status $status"
exit $status
