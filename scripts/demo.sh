#!/usr/bin/env bash
# Set up rgkern and run the CPU demo: train the small "cpu" preset on MSDS1 (4,000 generated
# images, 4,000 steps; about 9 minutes on a 2-core CPU, set-up included) and write into OUT (default demo_output/):
#   model.safetensors, model.json  the checkpoint
#   history.json, bpd.png          training and held-out bits/dim against the step, and the samples' quality score
#   samples.png                    64 samples of the trained model at temperature 1, the same 64 at 0.7
# The quality score of samples and data, then the final held-out bits/dim, are printed last. Usage: bash scripts/demo.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
out=${1:-demo_output}
# One thread: this small model's matrices are too small to gain from a second one, and on
# two cores the thread hand-offs cost more than they save (measured: 9 min with two threads).
"$PYTHON" -m rgkern train --preset cpu --out "$out" --overwrite --threads 1
