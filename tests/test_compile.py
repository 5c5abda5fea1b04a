"""torch.compile traces the reference path whole (fullgraph=True) and agrees with eager."""
import pytest
import torch

from utils import random_images, tiny_model


@pytest.fixture(scope="module")
def model():
    # The smallest model with two RG levels keeps compilation to seconds on a CPU.
    return tiny_model(4, 2, 2, dtype=torch.float32, n_layers=1, hidden=4, n_res=1, n_mlp=0)


def test_compiled_log_prob_and_decode_match_eager(model):
    torch._dynamo.reset()
    x = random_images(model, batch=4)
    compiled_log_prob = torch.compile(model.log_prob, fullgraph=True)  # inductor: real codegen
    torch.testing.assert_close(compiled_log_prob(x), model.log_prob(x), rtol=1e-5, atol=1e-5)
    z = model.encode(x)[0].detach()
    compiled_decode = torch.compile(model.decode, fullgraph=True)
    torch.testing.assert_close(compiled_decode(z), model.decode(z), rtol=1e-5, atol=1e-5)


def test_compiled_backward_matches_eager(model):
    torch._dynamo.reset()
    x = random_images(model, batch=4)
    # aot_eager traces forward and backward whole without the slow C++ code generation.
    compiled = torch.compile(model.log_prob, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.log_prob(x).sum().backward()
    for name_grad, eager in zip(compiled_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(name_grad, eager, rtol=1e-4, atol=1e-5)
    model.zero_grad()
