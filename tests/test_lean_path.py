"""The lean model path (stacked s/t networks): same function as the first layout, and its work counts.

The oracle is ``tests/legacy_model.py``, a frozen copy of the first layout (one
``nn.Linear`` per layer, separate s and t networks per half-step). Kernel and host-sync
counts are exact work counts on the CPU (docs/design.md section 9), not timings; they do not
depend on hidden size or batch, so a small hidden size counts as the paper's model does.
"""
import pytest
import torch

import rgkern
from rgkern.tools.checkpoint import convert_legacy_state_dict, is_legacy_state_dict, load_checkpoint, save_checkpoint
from rgkern.tools.profile import count_work, saved_activation_bytes

import legacy_model

PAPER_STRUCTURE = dict(image_size=32, channels=3, kernel_size=4, n_layers=(8, 6, 4, 2), hidden=8, n_res=4, n_mlp=2)


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def randomised_legacy(config, seed=0):
    """A legacy model in float64 with every parameter moved off its initial value."""
    torch.manual_seed(seed)
    model = legacy_model.RGFlow(**config, backend="torch").double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def lean_copy(old, **kwargs):
    new = rgkern.RGFlow(**old.config, backend="torch", **kwargs).double()
    assert is_legacy_state_dict(old.state_dict()) and not is_legacy_state_dict(new.state_dict())
    new.load_state_dict(convert_legacy_state_dict(old.state_dict(), new))
    return new


CONFIGS = [
    dict(image_size=8, channels=1, kernel_size=4, n_layers=1, hidden=8, n_res=1, n_mlp=0),
    dict(image_size=8, channels=3, kernel_size=2, n_layers=2, hidden=6, n_res=2, n_mlp=1),
    dict(image_size=16, channels=3, kernel_size=4, n_layers=(2, 1, 1), hidden=(8, 4, 6), n_res=(2, 1, 3), n_mlp=(2, 0, 3)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c['image_size']}-C{c['channels']}-k{c['kernel_size']}")
def test_lean_layout_is_the_legacy_function(config):
    old = randomised_legacy(config)
    new = lean_copy(old)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in old.parameters())
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(3, config["channels"], config["image_size"], config["image_size"], generator=g, dtype=torch.float64)

    z_old, logdet_old = old.encode(x)
    z_new, logdet_new = new.encode(x)
    assert relative_error(z_old, x) > 1e-2, "the couplings should not be the identity"
    assert relative_error(z_new, z_old) < 1e-10
    assert relative_error(logdet_new, logdet_old) < 1e-10
    assert relative_error(new.decode(z_old), old.decode(z_old)) < 1e-10

    old.log_prob(x).sum().backward()
    new.log_prob(x).sum().backward()
    old_params = dict(old.named_parameters())
    old_grads = convert_legacy_state_dict({k: old_params[k].grad for k in old_params}, new)
    for name, param in new.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert relative_error(param.grad, old_grads[name]) < 1e-10, name


def test_checkpoint_of_the_legacy_layout_loads(tmp_path):
    config = CONFIGS[2]
    old = randomised_legacy(config, seed=3)
    path = save_checkpoint(tmp_path / "legacy.safetensors", old)
    loaded = load_checkpoint(path, model=rgkern.RGFlow(**config, backend="torch").double())["model"]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert relative_error(loaded.log_prob(x), old.log_prob(x)) < 1e-10
    assert relative_error(loaded.decode(x), old.decode(x)) < 1e-10


def test_a_legacy_state_dict_missing_a_tensor_names_it():
    old = randomised_legacy(CONFIGS[0])
    state = old.state_dict()
    key = next(k for k in state if k.endswith("t_scale"))
    del state[key]
    with pytest.raises(KeyError, match="t_scale"):
        convert_legacy_state_dict(state, rgkern.RGFlow(**CONFIGS[0]))


def test_weight_norm_runs_once_per_stacked_tensor_and_pass():
    model = rgkern.RGFlow(**PAPER_STRUCTURE, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    model.encode(x)
    with torch.no_grad():
        work, _ = count_work(model.encode, x)
    stacked = sum(len(sublayer.networks.directions) for sublayer in model.sublayers)
    assert stacked == 8 * 3
    assert work.by_op["_weight_norm_interface"] == stacked


# ----------------------------------------------------------------------------- work counts
@pytest.fixture(scope="module")
def paper_structured():
    torch.manual_seed(0)
    model = rgkern.RGFlow(**PAPER_STRUCTURE, backend="torch")
    model.check_inputs = False
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_scale"):
                param.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def train():
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()

    for run in (train, lambda: model.sample(2)):  # warm up: geometry tables are built on first use
        run()
    return model, x, train


def test_training_pass_kernel_count(paper_structured):
    model, x, train = paper_structured
    work, _ = count_work(train)
    # 35,927 in the first layout; the lean-path issue asks for at most 18,000. 17,239 with the
    # masked half-steps; 17,212 since the torch path runs on the two halves of the rows apart
    # with the scales folded into the last linears.
    assert work.kernels <= 17_300, work.by_op.most_common(8)
    assert work.gemms == 2_880  # 960 forward GEMMs (s and t batched), two per GEMM backward
    assert work.syncs == 0


def test_authors_variant_training_pass_kernel_count():
    """The tied (s, t) pairs of variant "authors" add one gradient sum per shared use: 18,692."""
    torch.manual_seed(0)
    model = rgkern.RGFlow(**PAPER_STRUCTURE, backend="torch", variant="authors")
    model.check_inputs = False
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def train():
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()

    train()  # warm up: geometry tables are built on first use
    work, _ = count_work(train)
    assert work.kernels <= 18_800, work.by_op.most_common(8)
    assert work.gemms == 2_880 and work.syncs == 0


def test_encode_decode_and_sample_kernel_counts(paper_structured):
    model, x, _ = paper_structured
    with torch.no_grad():
        encode, (z, _) = count_work(model.encode, x)
        decode, _ = count_work(model.decode, z)
    sample, _ = count_work(model.sample, 16, generator=torch.Generator().manual_seed(0))
    assert encode.kernels <= 4_950  # 12,041 before; at most 6,000 asked
    assert decode.kernels <= 5_100  # 12,192 before
    assert sample.kernels <= decode.kernels + 64  # latents drawn in one call, not per sample
    assert encode.syncs == decode.syncs == sample.syncs == 0


def test_bf16_autocast_adds_at_most_five_percent(paper_structured):
    model, x, train = paper_structured
    plain, _ = count_work(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train()
        mixed, _ = count_work(train)
    assert mixed.kernels <= 1.05 * plain.kernels, (mixed.kernels, plain.kernels)
    assert mixed.syncs == 0


def test_incremental_update_with_a_cached_plan_has_no_host_sync(paper_structured):
    model, x, _ = paper_structured
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[11:21, 11:21] = True
    inc = rgkern.IncrementalEncoder(model, x)
    x_new = x.clone()
    x_new[..., region] += 0.5
    inc.update(x_new, region, check_region=False)  # builds and caches the plan
    x_new[..., region] -= 0.25
    work, z = count_work(inc.update, x_new, region, check_region=False)
    assert work.syncs == 0, work.by_op
    with torch.no_grad():
        assert relative_error(z, model.encode(x_new)[0]) < 1e-5


# ----------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_gives_the_same_gradients_and_saves_less():
    old = randomised_legacy(CONFIGS[2])
    plain = lean_copy(old)
    recomputed = lean_copy(old, activation_checkpointing=True)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    saved_plain, loss_plain = saved_activation_bytes(lambda: plain.log_prob(x).sum())
    saved_recomputed, loss_recomputed = saved_activation_bytes(lambda: recomputed.log_prob(x).sum())
    assert saved_recomputed < saved_plain / 3, (saved_recomputed, saved_plain)
    loss_plain.backward()
    loss_recomputed.backward()
    assert relative_error(loss_recomputed, loss_plain) < 1e-14
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert relative_error(b.grad, a.grad) < 1e-12, name


def test_activation_checkpointing_must_be_a_bool():
    with pytest.raises(TypeError, match="activation_checkpointing"):
        rgkern.RGFlow(8, 1, 4, n_layers=1, hidden=4, n_res=1, n_mlp=0, activation_checkpointing="yes")
