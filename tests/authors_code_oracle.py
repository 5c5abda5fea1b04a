"""An independent oracle for variant="authors": the authors' flow computed from their state dict.

Written from the published code's description (github hongyehu/RG-Flow, ``code/layers``):
full-image patch tables per sublayer (offset 0 first, then offset ``k * 2**h / 2``), an RNVP
block whose two half-steps share one (s, t) pair, residual MLPs with Swish and weight norm.
It shares no code with rgkern's model: it reads only a state dict in the authors' key layout.
"""
import math

import torch


def authors_patch_tables(L: int, k: int) -> list:
    """Per sublayer, the pixel rows and columns ``(P, k*k)`` of every patch, in x -> z order."""
    tables = []
    for h in range(int(math.log2(L // k)) + 1):
        dilation, stride = 2**h, k * 2**h
        n = (L - dilation * (k - 1) - 1) // stride + 1
        for offset in (0, stride // 2):
            a = torch.arange(k) * dilation
            within_rows, within_cols = a.repeat_interleave(k), a.repeat(k)
            patch_rows, patch_cols = (stride * torch.arange(n)).repeat_interleave(n), (stride * torch.arange(n)).repeat(n)
            rows = (within_rows[None, :] + patch_rows[:, None] + offset) % L
            cols = (within_cols[None, :] + patch_cols[:, None] + offset) % L
            tables.append((rows, cols))
    return tables


def _resnet(state, prefix, x, final_tanh):
    blocks = sorted({int(key[len(prefix):].split(".")[1]) for key in state if key.startswith(prefix + "res_blocks.")})
    for r in blocks:
        h = x
        m = 0
        while f"{prefix}res_blocks.{r}.{m}.scale" in state:
            h = h * torch.sigmoid(state[f"{prefix}res_blocks.{r}.{m}.scale"] * h)
            g = state[f"{prefix}res_blocks.{r}.{m + 1}.weight_g"]
            v = state[f"{prefix}res_blocks.{r}.{m + 1}.weight_v"]
            weight = g * v / v.norm(dim=1, keepdim=True)
            h = h @ weight.T + state[f"{prefix}res_blocks.{r}.{m + 1}.bias"]
            m += 2
        x = (x + h) / math.sqrt(2)
    x = state[f"{prefix}scale.scale"] * x
    return torch.tanh(x) if final_tanh else x


def authors_encode(state: dict, x: torch.Tensor):
    """``(z, ldj)`` of the authors' flow with weights ``state`` on images ``x (B, C, L, L)``."""
    B, C, L, _ = x.shape
    k = state["layers.0.mask_left"].shape[-1]
    ldj = x.new_zeros(B)
    for i, (rows, cols) in enumerate(authors_patch_tables(L, k)):
        patches = x[:, :, rows, cols]  # (B, C, P, k*k)
        P = patches.shape[2]
        y = patches.permute(0, 2, 1, 3).reshape(B * P, C * k * k)
        left = state[f"layers.{i}.mask_left"].reshape(-1)
        right = state[f"layers.{i}.mask_right"].reshape(-1)
        blocks = sorted({int(key.split(".")[3]) for key in state if key.startswith(f"layers.{i}.s_layers.")})
        for J in blocks:
            for mask, inv in ((left, right), (right, left)):
                conditioner = mask * y
                s = inv * _resnet(state, f"layers.{i}.s_layers.{J}.", conditioner, final_tanh=True)
                t = inv * _resnet(state, f"layers.{i}.t_layers.{J}.", conditioner, final_tanh=False)
                y = conditioner + inv * (y * torch.exp(s) + t)
                ldj = ldj + s.view(B, -1).sum(dim=1)
        x = x.clone()
        x[:, :, rows, cols] = y.view(B, P, C, k * k).permute(0, 2, 1, 3)
    return x, ldj


def authors_log_prob(state: dict, x: torch.Tensor) -> torch.Tensor:
    z, ldj = authors_encode(state, x)
    scale = state["prior.scale"]
    return (-z.abs() / scale - torch.log(2 * scale)).flatten(1).sum(dim=1) + ldj
