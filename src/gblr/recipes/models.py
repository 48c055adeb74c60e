"""Reference models whose linear layers can be dense, GBLR or a baseline family.

A compact ViT written here (rather than timm's) so that every linear layer is a plain
``nn.Linear`` with a predictable name, which :func:`structure_model` then swaps through
:func:`gblr.convert`; patch embedding and classifier stay dense, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..compress.convert import ConversionReport, convert

__all__ = ["VisionTransformer", "structure_model"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """A small ViT: patch embedding, class token, ``depth`` pre-norm blocks, linear head.

    Shapes: input ``(N, in_chans, image_size, image_size)``, output ``(N, num_classes)``.
    The structured candidates are ``blocks.*.{qkv, proj, fc1, fc2}``.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be a multiple of patch_size={patch_size}"
            )
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.patch = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def structure_model(
    model: nn.Module,
    structure: str,
    budget: float,
    *,
    include: str = "blocks.*",
    seed: int = 0,
) -> ConversionReport | None:
    """Make ``model``'s ``include`` linear layers structured, for training from scratch.

    ``"dense"`` leaves the model alone (returns ``None``). ``"gblr"``: GBLR layers at a
    starting cost of ``budget`` (the paper's half-full/half-narrow initialisation); a
    :class:`gblr.StructureLearner` then moves the MACs between layers. A baseline family:
    its largest configuration within ``budget`` in every layer (uniform allocation).
    """
    if structure == "dense":
        return None
    return convert(
        model,
        structure=structure,
        budget=budget,
        init="random",
        include=include,
        allocation="uniform",
        min_features=1,
        seed=seed,
    )
