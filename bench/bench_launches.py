"""Work per pass and the training step, lean layout against the first layout, side by side.

Run with ``pytest bench/bench_launches.py --benchmark-only``.

Groups (``benchmark.group``):

* ``train_step_layout``: one training step (log-likelihood, backward, gradient clipping,
  AdamW) of the model the lean-path issue measured its 2x on (the ``cpu`` preset's until
  2026-12-05: n_layers 3, hidden 48, n_res 1, n_mlp 1, 32x32x3, batch 32) on the CPU, or of
  the paper's model at batch 64 on a GPU. Paths: ``legacy``
  (the first layout, ``tests/legacy_model.py``, with the optimiser and clipping of that
  time: AdamW's default implementation, plain clipping) and ``lean`` (the stacked layout
  with :func:`rgkern.tools.trainer.make_optimizer` and foreach clipping), both at 1 and at 2
  CPU threads. ``extra_info``: ``kernels`` per step.
* ``work_count``: :func:`rgkern.tools.profile.count_work` of each pass of the
  paper-structured model (hidden 8: the counts do not depend on it). ``extra_info``:
  ``kernels``, ``gemms``, ``triton``, ``syncs``. The timing is of the counting itself and
  means nothing; the counts are the figures.
"""
import sys
from pathlib import Path

import pytest
import torch

import rgkern
from rgkern.tools.checkpoint import convert_legacy_state_dict
from rgkern.tools.profile import count_work
from rgkern.tools.trainer import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import legacy_model  # noqa: E402  (the frozen first layout, the tests' oracle)

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    STEP_MODEL = dict(image_size=32, channels=3, kernel_size=4)  # the paper's model
    STEP_BATCH, THREADS = 64, [None]
else:
    STEP_MODEL = dict(image_size=32, channels=3, kernel_size=4, n_layers=3, hidden=48, n_res=1, n_mlp=1)
    STEP_BATCH, THREADS = 32, [1, 2]
PAPER_STRUCTURE = dict(image_size=32, channels=3, kernel_size=4, n_layers=(8, 6, 4, 2), hidden=8, n_res=4, n_mlp=2)


def _models(device):
    torch.manual_seed(0)
    legacy = legacy_model.RGFlow(**STEP_MODEL, backend="torch")
    lean = rgkern.RGFlow(**STEP_MODEL, backend="torch")
    lean.load_state_dict(convert_legacy_state_dict(legacy.state_dict(), lean))
    for model in (legacy, lean):
        model.check_inputs = False
    return legacy.to(device), lean.to(device)


def _step(model, optimizer, x, foreach: bool):
    def step():
        optimizer.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach)
        optimizer.step()

    return step


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}" if t else "gpu")
@pytest.mark.parametrize("path", ["legacy", "lean"])
def test_train_step_layout(benchmark, device, path, threads):
    legacy, lean = _models(device)
    x = torch.randn(STEP_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    if path == "legacy":
        step = _step(legacy, torch.optim.AdamW(legacy.parameters(), lr=1e-3, weight_decay=5e-5), x, foreach=False)
    else:
        step = _step(lean, make_optimizer(lean.parameters(), 1e-3, 5e-5), x, foreach=True)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        step()
        work, _ = count_work(step)
        benchmark.group = "train_step_layout"
        benchmark.extra_info.update(kernels=work.kernels, batch=STEP_BATCH, threads=threads or torch.get_num_threads())
        if HAS_CUDA:
            benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
        else:
            benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paper_structured():
    torch.manual_seed(0)
    model = rgkern.RGFlow(**PAPER_STRUCTURE, backend="torch")
    model.check_inputs = False
    x = torch.randn(2, 3, 32, 32)

    def train():
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()

    def without_grad(fn):
        def run():
            with torch.no_grad():
                return fn(x)

        return run

    passes = {"train": train, "encode": without_grad(model.encode), "decode": without_grad(model.decode), "sample16": lambda: model.sample(16)}
    for fn in passes.values():
        fn()
    return passes


@pytest.mark.parametrize("name", ["train", "encode", "decode", "sample16"])
def test_work_count(benchmark, paper_structured, name):
    fn = paper_structured[name]
    work, _ = count_work(fn)
    benchmark.group = "work_count"
    benchmark.extra_info.update(kernels=work.kernels, gemms=work.gemms, triton=work.triton, syncs=work.syncs)
    benchmark.pedantic(lambda: count_work(fn), rounds=1, warmup_rounds=0)
