"""The authors' checkpoint files taken exactly: shapes, their multi-GPU key prefixes, the prior."""
import pytest
import torch

from rgkern.tools.authors_checkpoint import AuthorsCheckpointError, authors_state_dict, convert_authors_state_dict

from utils import random_authors_model

WEIGHT_V = "layers.0.s_layers.0.res_blocks.0.3.weight_v"  # the last linear: (D, hidden) = (16, 8) at C = 1, k = 4


def authors_state(dtype=torch.float64) -> dict:
    return authors_state_dict(random_authors_model(16, 1, 4, dtype=dtype, n_layers=1))


def test_a_transposed_weight_is_refused_though_it_has_the_right_number_of_values():
    state = authors_state()
    square = "layers.0.s_layers.0.res_blocks.0.3.weight_g"
    assert tuple(state[WEIGHT_V].shape) == (16, 8) and tuple(state[square].shape) == (16, 1)
    for key, bad in ((WEIGHT_V, state[WEIGHT_V].t().contiguous()), (square, state[square].view(1, 16)),
                     ("layers.0.s_layers.0.scale.scale", state["layers.0.s_layers.0.scale.scale"].view(4, 4))):
        changed = dict(state, **{key: bad})
        with pytest.raises(AuthorsCheckpointError, match=f"{key} (has|must have) shape"):
            convert_authors_state_dict(changed)


@pytest.mark.parametrize("prefix", ["module.", "module.net."])
def test_multi_gpu_prefixes_load_as_the_plain_keys(prefix):
    state = authors_state()
    plain, _ = convert_authors_state_dict(state)
    wrapped, _ = convert_authors_state_dict({prefix + key: value for key, value in state.items()})
    for (name, a), (_, b) in zip(plain.state_dict().items(), wrapped.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_file_without_prior_scale_names_the_missing_prior():
    state = authors_state()
    del state["prior.scale"]
    with pytest.raises(AuthorsCheckpointError, match="no prior.scale.*prior='laplace' or prior='gaussian'"):
        convert_authors_state_dict(state)
    assert convert_authors_state_dict(state, prior="gaussian")[0].prior.name == "gaussian"


def test_a_float16_file_reads_its_prior_in_its_own_precision():
    state = {key: value.to(torch.float16) for key, value in authors_state(torch.float64).items()}
    assert float(state["prior.scale"]) == 0.70703125  # 1/sqrt(2) rounded to float16
    model, _ = convert_authors_state_dict(state)
    assert model.prior.name == "laplace" and next(model.parameters()).dtype == torch.float16
    # The override the error message advises is accepted, whatever the file says.
    state["prior.scale"] = torch.tensor(0.3, dtype=torch.float16)
    with pytest.raises(AuthorsCheckpointError, match="prior.scale is 0.3"):
        convert_authors_state_dict(state)
    assert convert_authors_state_dict(state, prior="laplace")[0].prior.name == "laplace"
