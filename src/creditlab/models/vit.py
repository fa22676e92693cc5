"""A small Vision Transformer: ``vit-tiny`` (Dosovitskiy et al. 2021; the defaults are the
ViT-Ti / DeiT-Ti sizes of Touvron et al. 2021: dim 192, depth 12, 3 heads, MLP ratio 4).

Patch embedding: a Conv2d with kernel = stride = ``patch`` (so H and W must be multiples of
``patch``: 4 or 7 for 1x28x28, 4 for 3x32x32), flattened to tokens; a learned class token
(``nn.Parameter``, prepended with ``cls.expand(B, -1, -1)`` and ``torch.cat``) and a learned
position embedding (added); ``depth`` pre-norm blocks ``x = x + attn(LN(x))``, ``x = x +
mlp(LN(x))`` with multi-head self-attention and a GELU MLP (``dim -> mlp_ratio*dim -> dim``); a
final LayerNorm; a linear head on the class token. No dropout.

``attention``: ``manual`` (default) writes attention with one ``nn.Linear`` for q, k, v
(reshaped to heads, indexed, ``softmax(q k^T / sqrt(d)) v``) and an ``nn.Linear`` output
projection, so feedback alignment routes every weight matrix; ``torch`` uses
``nn.MultiheadAttention`` (its ``in_proj_weight`` is a bare parameter and its ``out_proj`` is
never *called*, so FA/DFA cannot route either: they refuse the model by name, and with
``fa:unrouted=autograd`` train the attention by autograd from the error that reaches it, i.e.
backprop inside the attention).

Init: truncated normal (std 0.02) for the linear weights, the class token and the position
embedding; zero biases; LayerNorm weight 1, bias 0; the patch convolution keeps PyTorch's init.
Written for ``torch.fx`` (no data-dependent control flow, no in-place operations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from creditlab.errors import ConfigError
from creditlab.models import register_model

ATTENTIONS = ("manual", "torch")


class Attention(nn.Module):
    """Multi-head self-attention from Linear layers: qkv = W_qkv x, softmax(q k^T / sqrt(d)) v, W_o."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # (B, N, 3*dim) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).flatten(2)  # (B, N, dim)
        return self.proj(out)


class TorchAttention(nn.Module):
    """nn.MultiheadAttention (batch_first), self-attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads) if attention == "manual" else TorchAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, dim: int, depth: int, heads: int,
                 patch: int, mlp_ratio: float, attention: str):
        super().__init__()
        c, h, w = in_shape
        self.patch_embed = nn.Conv2d(c, dim, kernel_size=patch, stride=patch)
        n = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"model 'vit-tiny': {what}={v!r} must be an integer >= 1")
    return v


@register_model("vit-tiny", "small Vision Transformer: conv patch embedding, class token, pre-norm MHSA + GELU MLP "
                            "blocks; options dim, depth, heads, patch, mlp_ratio, attention=manual|torch")
def vit_tiny(in_shape, num_classes, dim: int = 192, depth: int = 12, heads: int = 3, patch: int = 4,
             mlp_ratio: float = 4.0, attention: str = "manual"):
    if len(in_shape) != 3:
        raise ConfigError(f"model 'vit-tiny' needs image input (C, H, W), got in_shape={tuple(in_shape)}; "
                          "use an image dataset (mnist, cifar10, ...)")
    dim, depth, heads, patch = (_positive_int(v, k) for v, k in
                                ((dim, "dim"), (depth, "depth"), (heads, "heads"), (patch, "patch")))
    if dim % heads:
        raise ConfigError(f"model 'vit-tiny': dim={dim} must be a multiple of heads={heads}")
    c, h, w = (int(s) for s in in_shape)
    if h % patch or w % patch:
        raise ConfigError(f"model 'vit-tiny': patch={patch} must divide the image size {h}x{w} "
                          "(e.g. 4 or 7 for 28x28, 4 for 32x32)")
    if not float(mlp_ratio) > 0:
        raise ConfigError(f"model 'vit-tiny': mlp_ratio={mlp_ratio!r} must be > 0")
    att = str(attention).strip().lower()
    if att not in ATTENTIONS:
        raise ConfigError(f"model 'vit-tiny': attention={attention!r}; choose manual (Linear qkv, routed by FA) "
                          "or torch (nn.MultiheadAttention)")
    return VisionTransformer((c, h, w), num_classes, dim, depth, heads, patch, float(mlp_ratio), att)
