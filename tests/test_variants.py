"""variant="authors" (the published code's model) against an independent oracle, and its checkpoints."""
import math

import pytest
import torch

import rgkern
from rgkern.checkpoint import load_authors_checkpoint as facade_loader
from rgkern.cli import main as cli_main
from rgkern.tools.authors_checkpoint import (
    AuthorsCheckpointError,
    authors_state_dict,
    convert_authors_state_dict,
    load_authors_checkpoint,
)
from rgkern.tools.checkpoint import load_model, save_checkpoint

from authors_code_oracle import authors_encode, authors_log_prob
from utils import random_authors_model, random_images, tiny_model


def authors_parameter_count(L, C, k, n_layers, hidden, n_res, n_mlp):
    """The authors' model's parameters, counted from their module structure (main.build_rnvp).

    Per sublayer (two per level) and block: an s and a t ResNet of n_res residual blocks, each
    [Swish (w_in slopes), weight-normalised Linear (w_out * w_in direction, w_out magnitudes,
    w_out biases)] per linear, and a final Scale of D values.
    """
    D = C * k * k
    widths = [D] + [hidden] * n_mlp + [D]
    per_net = n_res * sum(w_in + w_out * w_in + 2 * w_out for w_in, w_out in zip(widths[:-1], widths[1:])) + D
    return sum(2 * blocks * 2 * per_net for blocks in n_layers)


# ----------------------------------------------------------------------------- the variant
def test_paper_size_authors_variant_has_the_authors_parameter_count():
    model = rgkern.RGFlow(variant="authors")
    expected = authors_parameter_count(32, 3, 4, (8, 6, 4, 2), 512, 4, 2)
    assert sum(p.numel() for p in model.parameters()) == expected == 100_647_680
    paper = rgkern.RGFlow()
    assert sum(p.numel() for p in paper.parameters()) == 201_295_360  # two (s, t) pairs per block


def test_authors_order_puts_offset_zero_first_and_ties_the_pairs():
    model = rgkern.RGFlow(8, 3, 4, n_layers=(3, 2), hidden=8, n_res=1, n_mlp=1, variant="authors")
    assert [s.offset for s in model.geometry.sublayers] == [0, 2, 0, 4]
    assert [s.offset for s in rgkern.RGFlow(8, 3, 4, n_layers=1, hidden=8, n_res=1, n_mlp=1).geometry.sublayers] == [2, 0, 4, 0]
    assert [s.networks.pairs for s in model.sublayers] == [3, 3, 2, 2]
    assert model.variant == "authors" and model.config["variant"] == "authors"


@pytest.mark.parametrize("L,C,k", [(8, 1, 2), (16, 3, 4), (32, 1, 4)])
def test_authors_variant_equals_the_independent_oracle(L, C, k):
    """encode, log-det and log_prob against the authors' flow computed from their state dict."""
    n_layers = tuple(2 if h == 0 else 1 for h in range(rgkern.core.geometry.num_levels(L, k)))
    model = random_authors_model(L, C, k, n_layers=n_layers)
    x = random_images(model)
    state = authors_state_dict(model)
    z, logdet = model.encode(x)
    z_ref, logdet_ref = authors_encode(state, x)
    assert (z - x).abs().max() > 0.1, "the couplings should not be the identity"
    assert (z - z_ref).abs().max() / z_ref.abs().max() < 1e-12
    assert (logdet - logdet_ref).abs().max() / logdet_ref.abs().max() < 1e-12
    lp, lp_ref = model.log_prob(x), authors_log_prob(state, x)
    assert (lp - lp_ref).abs().max() / lp_ref.abs().max() < 1e-12
    # The paper variant with the same geometry computes a different function.
    paper = tiny_model(L, C, k, n_layers=n_layers, hidden=8, n_res=2, n_mlp=1)
    assert (paper.encode(x)[0] - z_ref).abs().max() > 1e-3


def test_authors_initialisation():
    torch.manual_seed(0)
    nets = rgkern.RGFlow(32, 3, 4, n_layers=1, hidden=512, n_res=1, n_mlp=1, init="authors").sublayers[0].networks
    v, b = nets.directions[0].detach(), nets.biases[0].detach()  # 48 -> 512
    assert float(v.std()) == pytest.approx(math.sqrt(2.81 / 48), rel=0.02)  # uniform +-sqrt(2.81 * 3 / fan_in)
    assert float(v.abs().max()) <= math.sqrt(2.81 * 3 / 48)
    assert bool((b == 0).all())
    torch.testing.assert_close(nets.magnitudes[0], v.norm(dim=-1, keepdim=True))
    torch.manual_seed(0)
    default = rgkern.RGFlow(32, 3, 4, n_layers=1, hidden=512, n_res=1, n_mlp=1, init="torch").sublayers[0].networks
    assert float(default.directions[0].detach().std()) == pytest.approx(1 / math.sqrt(3 * 48), rel=0.02)
    assert float(default.biases[0].abs().max()) > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="published"), "unknown variant 'published'; expected one of \\('paper', 'authors'\\)"),
    (dict(init="xavier"), "unknown init 'xavier'"),
    (dict(variant="authors", init="kaiming"), "unknown init 'kaiming'"),
])
def test_unknown_variant_or_init_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rgkern.RGFlow(8, 1, 4, n_layers=1, hidden=4, n_res=1, n_mlp=1, **kwargs)


def test_rgkern_checkpoint_keeps_the_variant(tmp_path):
    model = random_authors_model(dtype=torch.float32)
    path = save_checkpoint(tmp_path / "model.safetensors", model)
    loaded = load_model(path)
    assert loaded.variant == "authors"
    x = random_images(model)
    assert torch.equal(loaded.encode(x)[0], model.encode(x)[0])


# ----------------------------------------------------------------------------- the authors' files
def save_authors_file(path, model, wrap=True, **extra):
    state = authors_state_dict(model)
    state.update(extra)
    torch.save({"flow": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}} if wrap else state, path)
    return state


@pytest.mark.parametrize("wrap", [True, False])
def test_authors_checkpoint_loads_back_to_the_same_function(tmp_path, wrap):
    model = random_authors_model(16, 3, 4, n_layers=(2, 1, 1), hidden=(8, 6, 4), n_res=(2, 1, 1), n_mlp=(1, 2, 1))
    path = tmp_path / "12.state"
    save_authors_file(path, model, wrap)
    loaded = load_authors_checkpoint(path)
    assert loaded.config == model.config
    x = random_images(model)
    z, logdet = model.encode(x)
    z2, logdet2 = loaded.encode(x)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)
    assert torch.equal(loaded.decode(z), model.decode(z)) and torch.equal(loaded.log_prob(x), model.log_prob(x))


def test_authors_layout_shapes_by_hand():
    model = random_authors_model(16, 3, 4, n_layers=(2, 1, 1), hidden=8, n_res=2, n_mlp=1)
    state = authors_state_dict(model)
    assert state["layers.0.mask_left"].shape == (3, 4, 4) and state["layers.0.mask_left"][0, 0, 0] == 1
    assert state["layers.0.mask_left"][0, 0, 1] == 0 and torch.equal(state["layers.0.mask_right"], 1 - state["layers.0.mask_left"])
    assert state["layers.1.s_layers.1.res_blocks.1.0.scale"].shape == (48,)
    assert state["layers.1.s_layers.1.res_blocks.1.1.weight_v"].shape == (8, 48)
    assert state["layers.1.s_layers.1.res_blocks.1.1.weight_g"].shape == (8, 1)
    assert state["layers.1.t_layers.0.res_blocks.0.3.weight_v"].shape == (48, 8)
    assert state["layers.3.t_layers.0.scale.scale"].shape == (48,)
    assert "layers.3.t_layers.1.scale.scale" not in state  # one block at level 1
    # Per block: 2 networks x (2 residual blocks x 2 linears x 4 tensors + 3 scale tensors); 2 masks per sublayer.
    assert len([k for k in state if k.startswith("layers.")]) == (2 + 2 + 1 + 1 + 1 + 1) * 2 * (2 * 2 * 4 + 3) + 6 * 2
    assert float(state["prior.scale"]) == pytest.approx(1 / math.sqrt(2))


def test_dataparallel_prefix_and_parametrized_weight_norm_names_load(tmp_path):
    model = random_authors_model(8, 1, 4, n_layers=1)
    state = authors_state_dict(model)
    renamed = {}
    for key, value in state.items():
        key = key.replace("weight_g", "parametrizations.weight.original0").replace("weight_v", "parametrizations.weight.original1")
        renamed["module." + key] = value
    loaded, _ = convert_authors_state_dict(renamed)
    x = random_images(model)
    assert torch.equal(loaded.encode(x)[0], model.encode(x)[0])


def test_gaussian_prior_is_read_from_prior_scale_and_overrides_apply():
    model = random_authors_model(8, 1, 4, n_layers=1, prior="gaussian")
    state = authors_state_dict(model)
    assert float(state["prior.scale"]) == 1.0
    assert convert_authors_state_dict(state)[0].prior.name == "gaussian"
    assert convert_authors_state_dict(state, prior="laplace")[0].prior.name == "laplace"


def test_import_authors_command_writes_an_rgkern_checkpoint(tmp_path):
    model = random_authors_model(16, 3, 4, dtype=torch.float32)
    save_authors_file(tmp_path / "3.state", model)
    assert cli_main(["import-authors", str(tmp_path / "3.state"), "--out", str(tmp_path / "run")]) == 0
    loaded = load_model(tmp_path / "run" / "model.safetensors")
    x = random_images(model)
    assert loaded.variant == "authors"
    assert torch.equal(loaded.encode(x)[0], model.encode(x)[0])


# ----------------------------------------------------------------------------- bad files
def test_a_state_file_of_another_model_is_refused_by_name(tmp_path):
    path = tmp_path / "other.state"
    torch.save({"flow": torch.nn.Linear(3, 4).state_dict()}, path)
    with pytest.raises(AuthorsCheckpointError, match="no 'layers.<i>.mask_left' tensors.*'bias', 'weight'"):
        load_authors_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("layers.1.t_layers.0.res_blocks.0.1.bias"), "missing tensor 'bias' of layers.1.t_layers.0.res_blocks.0.1"),
    (lambda s: s.__setitem__("layers.0.s_layers.0.res_blocks.0.3.weight_v", torch.zeros(16, 5)), "layers.0.s_layers.0.res_blocks.0.3.weight_v has shape \\(16, 5\\)"),
    (lambda s: s.__setitem__("layers.0.s_layers.0.res_blocks.0.1.weight_v", torch.zeros(5, 16)), "hidden differs between the two sublayers of level 0 \\(layers.0: 5, layers.1: 8\\)"),
    (lambda s: s.__setitem__("layers.0.extra", torch.zeros(1)), "unexpected tensor 'layers.0.extra'"),
    (lambda s: s.__setitem__("layers.0.s_layers.0.res_blocks.0.1.weight_u", torch.zeros(1)), "unexpected tensor 'layers.0.s_layers.0.res_blocks.0.1.weight_u'"),
    (lambda s: s.__setitem__("prior.scale", torch.tensor(0.3)), "prior.scale is 0.3"),
    (lambda s: s.__setitem__("layers.2.s_layers.5.scale.scale", torch.zeros(16)), "'layers.2.s_layers.5.scale.scale' does not fit"),
    (lambda s: s.__setitem__("layers.2.s_layers.5.res_blocks.0.0.scale", torch.zeros(16)), "layers.2: blocks \\[0, 5\\]"),
])
def test_a_damaged_authors_state_dict_names_the_key(change, message):
    model = random_authors_model(16, 1, 4, n_layers=1)
    state = authors_state_dict(model)
    change(state)
    with pytest.raises(AuthorsCheckpointError, match=message):
        convert_authors_state_dict(state)


def test_missing_and_unreadable_authors_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no authors' checkpoint at"):
        load_authors_checkpoint(tmp_path / "absent.state")
    (tmp_path / "junk.state").write_bytes(b"not a torch file")
    with pytest.raises(AuthorsCheckpointError, match="junk.state is not a torch.save file"):
        load_authors_checkpoint(tmp_path / "junk.state")
    with pytest.raises(ValueError, match="only variant='authors' models"):
        authors_state_dict(tiny_model(8, 1, 4))


def test_region_plans_of_the_two_variants_of_one_size_are_not_shared():
    """decode_region caches plans per geometry: the variants' geometries differ only in order."""
    from rgkern.locality.region import decode_region

    region = torch.zeros(16, 16, dtype=torch.bool)
    region[5:9, 6:11] = True
    for variant in ("paper", "authors", "paper"):
        model = tiny_model(16, 2, 4, n_layers=1, variant=variant)
        z = random_images(model)
        expected = model.decode(z)[:, :, region]
        assert (decode_region(model, z, region) - expected).abs().max() < 1e-12, variant


def test_design_api_name_is_the_same_function():
    """docs/design.md section 6 names rgkern.checkpoint.load_authors_checkpoint."""
    assert facade_loader is load_authors_checkpoint is rgkern.load_authors_checkpoint


def test_each_variant_defaults_to_the_initialisation_that_learned_faster():
    """README, "Initialisation": the authors' for the paper variant, PyTorch's for the authors' variant."""
    small = dict(image_size=8, channels=1, kernel_size=4, n_layers=1, hidden=4, n_res=1, n_mlp=1)
    assert rgkern.RGFlow(**small).init == "authors"
    assert rgkern.RGFlow(**small, variant="authors").init == "torch"
    assert rgkern.RGFlow(**small, variant="authors", init="authors").init == "authors"
    assert bool((rgkern.RGFlow(**small).sublayers[0].networks.biases[0] == 0).all())  # the authors' zero biases
