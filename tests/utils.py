"""Shared helpers for the tests."""
import torch

import rgkern


def tiny_model(L=8, C=1, k=4, dtype=torch.float64, seed=0, scale_std=0.5, **kwargs):
    """A small RGFlow whose couplings are NOT the identity.

    The learned output scales of s and t start at zero (every coupling is the identity at
    initialisation); tests that compare paths must not run on that, so they are randomised.
    """
    # PyTorch's initialisation for both variants: with the authors' (3x wider weights, zero
    # biases) and randomised output scales, latents reach 1e4 and the round trip loses
    # digits to conditioning, not to a bug; the initialisation itself is tested on its own.
    config = dict(n_layers=1, hidden=8, n_res=1, n_mlp=1, backend="torch", init="torch")
    config.update(kwargs)
    torch.manual_seed(seed)
    model = rgkern.RGFlow(image_size=L, channels=C, kernel_size=k, **config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("s_scale") or name.endswith("t_scale"):
                param.normal_(0, scale_std)
    return model


def random_images(model, batch=3, seed=1, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    L, C = model.image_size, model.channels
    dtype = next(model.parameters()).dtype
    return scale * torch.randn(batch, C, L, L, generator=g, dtype=torch.float64).to(dtype)


def random_scales(model, generator: torch.Generator) -> None:
    """Randomise the zero-initialised s/t output scales so the couplings are not the identity."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("s_scale") or name.endswith("t_scale"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype))
