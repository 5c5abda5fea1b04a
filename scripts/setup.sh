# Set-up shared by scripts/demo.sh and scripts/test.sh (sourced from the repository root).
#
# torch is installed only when missing, and pinned: on the project's machines torch==2.13.0
# resolves to a local CPU build in seconds, while an unpinned `pip install torch` pulls a
# multi-GB CUDA build. Then rgkern itself, editable, with the test extras.
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -e ".[test]"
# On a CPU shared with other jobs, OpenMP threads that spin while waiting slow small models
# down many times over; passive waiting costs nothing measurable when the CPU is free.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
