"""Data-parallel training under torchrun (rgkern.tools.distributed): two CPU processes on gloo.

The runs go through the real entry point, ``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m rgkern train ...`` (``--standalone`` picks a free port), and are
compared with single-process training of the same global batch.
"""
import os
import subprocess
import sys

import pytest
import torch

from rgkern import cli
from rgkern.tools import distributed as dist_utils
from rgkern.tools.checkpoint import load_checkpoint
from rgkern.tools.distributed import DistributedContext, DistributedSetupError
from rgkern.tools.presets import make_config
from rgkern.tools.train import CHECKPOINT_NAME, train
from rgkern.tools.trainer import batch_indices

pytestmark = pytest.mark.slow  # pyproject.toml registers the markers: -m "not slow" and the like select by them

STEPS = 4


def quiet(_line):
    pass


def torchrun(out, *args, nproc=2):
    """``torchrun --standalone --nproc_per_node=nproc -m rgkern train --preset tiny ...`` on the CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "rgkern", "train", "--preset", "tiny", "--out", str(out), "--device", "cpu",
        "--threads", "1", "--no-progress", "--num-samples", "4", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def single_process(out, steps):
    config = make_config("tiny", steps=steps, device="cpu")
    return train(config, out, progress=False, log=quiet)


def relative_difference(model_a, model_b) -> float:
    """|a - b| / |b| over all parameters together."""
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a)
    den = sum(float((b[k].double() ** 2).sum()) for k in a)
    return (num / den) ** 0.5


def assert_close_models(model_a, model_b):
    # All-reduce sums the two half-batch gradients in another order than one process does:
    # measured 3e-8 relative over all weights after 4 AdamW steps at lr 1e-2 (largest single
    # element 6e-7 in absolute value).
    assert relative_difference(model_a, model_b) < 1e-6
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(value, model_b.state_dict()[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two processes train STEPS steps of the tiny preset (global batch 16 = 2 x 8)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(out, "--steps", str(STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# ----------------------------------------------------------------------------- torchrun
def test_ddp_training_equals_single_process_and_resumes(ddp_run, tmp_path):
    out, result = ddp_run
    # Rank 0 alone logs and writes.
    assert result.stdout.count("final held-out bits/dim") == 1
    assert "DDP over 2 processes (8 images each per step)" in result.stdout
    for name in ("model.safetensors", "history.json", "bpd.png", "samples.png"):
        assert (out / name).is_file(), name
    distributed = load_checkpoint(out / CHECKPOINT_NAME)
    assert distributed["step"] == STEPS and distributed["info"]["world_size"] == 2

    reference = single_process(tmp_path / "single", STEPS)
    assert_close_models(distributed["model"], reference.model)
    ddp_history, single_history = distributed["info"]["history"], reference.history
    assert [e["step"] for e in ddp_history] == [e["step"] for e in single_history] == [0, STEPS]
    for mine, theirs in zip(ddp_history, single_history):
        assert mine["test_bpd"] == pytest.approx(theirs["test_bpd"], rel=1e-6)
        if theirs["train_bpd"] is not None:  # the mean over both processes = the global batch's
            assert mine["train_bpd"] == pytest.approx(theirs["train_bpd"], rel=1e-6)

    # Resume under DDP: STEPS + STEPS steps equal 2 * STEPS steps in one process.
    resumed = torchrun(out, "--steps", str(2 * STEPS), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out / CHECKPOINT_NAME} at step {STEPS}" in resumed.stdout
    continued = load_checkpoint(out / CHECKPOINT_NAME)
    assert continued["step"] == 2 * STEPS
    longer = single_process(tmp_path / "single_longer", 2 * STEPS)
    assert_close_models(continued["model"], longer.model)
    assert [e["step"] for e in continued["info"]["history"]] == [0, STEPS, 2 * STEPS]


def test_resume_with_other_settings_is_refused_under_ddp(ddp_run):
    out, _ = ddp_run
    before = (out / CHECKPOINT_NAME).read_bytes()
    result = torchrun(out, "--steps", str(2 * STEPS), "--resume", "--batch-size", "8")
    assert result.returncode != 0
    assert "rgkern train: error: cannot resume" in result.stderr and "'batch_size': (16, 8)" in result.stderr
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_global_batch_must_split_evenly(tmp_path):
    result = torchrun(tmp_path / "run", "--batch-size", "15", "--steps", "1")
    assert result.returncode != 0
    assert "the global batch size 15 is not divisible by the number of processes 2" in result.stderr
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


# ----------------------------------------------------------------------------- in-process checks
def test_more_processes_than_gpus_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedSetupError, match=r"started 4 processes .*LOCAL_WORLD_SIZE=4.* only 1 CUDA device"):
        dist_utils.resolve_device("cuda", DistributedContext(world_size=4, rank=0, local_rank=0, local_world_size=4))
    # Through the command line, as torchrun would start it: exit code 2 and one line, before any work.
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    code = cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cuda", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rgkern train: error: torchrun started 2 processes" in err and "only 1 CUDA device" in err
    assert not (tmp_path / "run").exists()


def test_explicit_cuda_index_other_than_local_rank_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    context = DistributedContext(world_size=2, rank=1, local_rank=1, local_world_size=2)
    assert dist_utils.resolve_device("cuda", context) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=1 uses cuda:1"):
        dist_utils.resolve_device("cuda:0", context)
    assert dist_utils.resolve_device("cpu", context) == torch.device("cpu")


def test_context_from_environment():
    assert dist_utils.context_from_environment({}) == DistributedContext()
    assert not dist_utils.context_from_environment({}).enabled
    context = dist_utils.context_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert context == DistributedContext(4, 3, 1, 2) and context.enabled and not context.is_main
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        dist_utils.context_from_environment({"WORLD_SIZE": "4", "RANK": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        dist_utils.context_from_environment({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})


def test_shards_are_distributed_sampler_batches():
    """shard(global batch) = what DistributedSampler + a per-process batch give over the epoch's permutation."""
    from torch.utils.data import DistributedSampler

    num_images, global_batch, world = 50, 12, 3
    per_epoch = num_images // global_batch
    permutation = torch.cat([batch_indices(s, num_images, global_batch, seed=5) for s in range(per_epoch)])
    for rank in range(world):
        sampler = DistributedSampler(permutation.tolist(), num_replicas=world, rank=rank, shuffle=False, drop_last=True)
        mine = permutation[list(sampler)]
        context = DistributedContext(world, rank, rank, world)
        for step in range(per_epoch):
            expected = mine[step * (global_batch // world) : (step + 1) * (global_batch // world)]
            assert torch.equal(dist_utils.shard(batch_indices(step, num_images, global_batch, seed=5), context), expected)
    assert dist_utils.check_global_batch_size(12, 3) == 4
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the number of processes 5"):
        dist_utils.check_global_batch_size(12, 5)


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (torch.distributed, in memory)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_shutdown_waits_until_the_backend_lets_go_of_the_tensors(one_process_group, monkeypatch):
    """The process group ends only once no backend thread references a tensor of our collectives.

    A thread that drops such a reference takes the GIL; a gloo worker that does it while the
    interpreter shuts down aborts the process. The DDP run met that about one time in ten, on
    rank 1, which exits right after the final broadcast of the history. Here a stand-in
    backend keeps a C++ reference to each tensor (an autograd node saving it) and drops it
    from another thread 50 ms after shutdown begins.
    """
    import threading
    import time

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    released, shutting_down = [], threading.Event()
    for name in ("broadcast", "all_reduce"):
        original = getattr(distributed_c10d, name)

        def backend(tensor, *args, _original=original, **kwargs):
            result = _original(tensor, *args, **kwargs)
            holder = [tensor * torch.ones((), requires_grad=True)]  # the product's grad_fn saves `tensor`
            assert tensor._use_count() > 1

            def let_go():
                shutting_down.wait()
                time.sleep(0.05)
                holder.clear()
                released.append(tensor._use_count() == 1)

            threading.Thread(target=let_go, daemon=True).start()
            return result

        monkeypatch.setattr(dist, name, backend)
    # The one-process group stands in for the two ranks the context claims: rank 0 is the source.
    context = DistributedContext(world_size=2, rank=0, local_rank=0, local_world_size=2)
    history = [{"step": 4, "test_bpd": 9.49}]
    assert dist_utils.broadcast_object(history, context) == history
    mean = dist_utils.all_reduce_mean(torch.tensor([3.0, 5.0]), context)
    torch.testing.assert_close(mean, torch.tensor([1.5, 2.5]))  # one process's sum over the two claimed
    assert released == []
    shutting_down.set()
    dist_utils.shutdown_distributed()
    assert not dist.is_initialized()
    assert released == [True, True, True]  # size and payload of the broadcast, the all-reduce


def test_shutdown_says_so_when_the_backend_never_lets_go(one_process_group):
    """Waiting has a bound: a backend that keeps a tensor gets a warning naming the risk, not a hang."""
    context = DistributedContext(world_size=2, rank=0, local_rank=0, local_world_size=2)
    dist_utils._HANDED_TO_BACKEND.clear()
    dist_utils.all_reduce_mean(torch.tensor([1.0]), context)
    kept = [t * torch.ones((), requires_grad=True) for t in dist_utils._HANDED_TO_BACKEND]  # a reference never dropped
    with pytest.warns(RuntimeWarning, match=r"still holds 1 of the tensors of our last collectives after 0.05 s"):
        dist_utils._wait_until_backend_lets_go(timeout=0.05)
    assert not dist_utils._HANDED_TO_BACKEND and kept

