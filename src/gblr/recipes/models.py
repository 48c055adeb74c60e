"""Reference models whose linear layers can be dense, GBLR or a baseline family.

A compact ViT, MLP-Mixer and GPT-style causal transformer written here (rather than taken
from timm) so that every linear layer of the blocks is a plain ``nn.Linear`` with a
predictable name (``blocks.<i>.{qkv, proj, fc1, fc2}``;
``blocks.<i>.{token_mlp, channel_mlp}.{fc1, fc2}``),
which [`structure_model`][gblr.recipes.models.structure_model] then swaps through
[`gblr.convert`][], and so that the package needs no timm for training from scratch. Patch embedding
and classifier stay dense, as in the paper. Sizes of the paper's CIFAR models:
[`vit_small_patch4_32`][gblr.recipes.models.vit_small_patch4_32] and
[`mixer_small_patch4_32`][gblr.recipes.models.mixer_small_patch4_32].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..compress.configs import (
    ConversionConfig,
    FamilyConfig,
    GBLRConfig,
    config_class,
    config_from_dict,
)
from ..compress.convert import ConversionReport, convert

__all__ = [
    "CausalTransformer",
    "MlpMixer",
    "VisionTransformer",
    "mixer_small_patch4_32",
    "structure_model",
    "vit_small_patch4_32",
]


def _drop_path(rate: float) -> nn.Module:
    """Stochastic depth on a residual branch (per sample), torchvision's implementation."""
    if rate == 0.0:
        return nn.Identity()
    try:
        from torchvision.ops import StochasticDepth
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("drop_path > 0 needs torchvision: pip install 'gblr[vision]'") from error
    return StochasticDepth(rate, mode="row")


def _patch_count(image_size: int, patch_size: int) -> int:
    """Patches of a square image cut into square patches (checked to tile it exactly)."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    return (image_size // patch_size) ** 2


def _drop_path_rates(drop_path: float, depth: int) -> list[float]:
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    # rising linearly with depth, as in timm's ViT and Mixer
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


class _Block(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.drop_path(self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim)))
        mlp = self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return x + self.drop_path(mlp)


class VisionTransformer(nn.Module):
    """A small ViT: patch embedding, class token, ``depth`` pre-norm blocks, linear head.

    Shapes: input ``(N, in_chans, image_size, image_size)``, output ``(N, num_classes)``.
    The structured candidates are ``blocks.*.{qkv, proj, fc1, fc2}``. ``drop_path``:
    stochastic depth of the last block (rising linearly from 0 in the first).

    Examples:
        >>> import torch
        >>> from gblr.recipes.models import VisionTransformer
        >>> model = VisionTransformer(image_size=8, patch_size=2, in_chans=1, dim=32, depth=2)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
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
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        patches = _patch_count(image_size, patch_size)
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        if int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} must give a hidden size >= 1 at dim={dim}")
        self.patch = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        tokens = patches + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, rate) for rate in _drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class CausalTransformer(nn.Module):
    """A small GPT-style language model: token and learned position embeddings,
    ``depth`` pre-norm blocks with causal self-attention, a final norm and a linear head
    tied to the token embedding.

    Shapes: input ``(N, T)`` token ids (int64, ``T <= context``), output logits
    ``(N, T, vocab_size)``. The structured candidates are ``blocks.*.{qkv, proj, fc1,
    fc2}``, as in [`VisionTransformer`][gblr.recipes.models.VisionTransformer].

    Examples:
        >>> import torch
        >>> from gblr.recipes.models import CausalTransformer
        >>> model = CausalTransformer(vocab_size=256, context=16, dim=32, depth=2, heads=2)
        >>> model(torch.randint(0, 256, (3, 16))).shape
        torch.Size([3, 16, 256])
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 128,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 0.02)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.context:
            raise ValueError(
                f"input_ids must be (N, T) with T <= context={self.context}, "
                f"got shape {tuple(input_ids.shape)}"
            )
        x = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Mlp(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _MixerBlock(nn.Module):
    def __init__(
        self, tokens: int, dim: int, token_hidden: int, channel_hidden: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = _Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = _Mlp(dim, channel_hidden)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.drop_path(mixed)
        return x + self.drop_path(self.channel_mlp(self.norm2(x)))


class MlpMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al., 2021): patch embedding, ``depth`` blocks of token
    mixing and channel mixing MLPs, global average pooling, linear head.

    Hidden sizes follow timm's convention: ``token_mlp_ratio * dim`` and
    ``channel_mlp_ratio * dim``. Shapes: input ``(N, in_chans, image_size, image_size)``,
    output ``(N, num_classes)``. The structured candidates are
    ``blocks.*.{token_mlp, channel_mlp}.{fc1, fc2}``.

    Examples:
        >>> import torch
        >>> from gblr.recipes.models import MlpMixer
        >>> model = MlpMixer(image_size=8, patch_size=2, in_chans=1, dim=32, depth=2)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 512,
        depth: int = 8,
        token_mlp_ratio: float = 0.5,
        channel_mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        tokens = _patch_count(image_size, patch_size)
        token_hidden, channel_hidden = int(token_mlp_ratio * dim), int(channel_mlp_ratio * dim)
        if min(token_hidden, channel_hidden) < 1:
            raise ValueError(
                f"token_mlp_ratio={token_mlp_ratio} and channel_mlp_ratio={channel_mlp_ratio} "
                f"must give hidden sizes >= 1 at dim={dim}"
            )
        self.patch = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(
            _MixerBlock(tokens, dim, token_hidden, channel_hidden, rate)
            for rate in _drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def vit_small_patch4_32(num_classes: int = 10, drop_path: float = 0.1) -> VisionTransformer:
    """ViT-S/4 for 32x32 images (the paper's CIFAR ViT): 384 wide, 12 blocks, 6 heads,
    MLP ratio 4 (timm's ViT-S), 4x4 patches. Input ``(N, 3, 32, 32)``, output
    ``(N, num_classes)``.

    Examples:
        >>> import torch
        >>> from gblr.recipes.models import vit_small_patch4_32
        >>> with torch.device("meta"):  # shapes only, no memory
        ...     model = vit_small_patch4_32(num_classes=100)
        >>> model(torch.empty(2, 3, 32, 32, device="meta")).shape
        torch.Size([2, 100])
        >>> sum(p.numel() for p in model.parameters())
        21376996
    """
    return VisionTransformer(32, 4, 3, num_classes, 384, 12, 6, 4.0, drop_path)


def mixer_small_patch4_32(num_classes: int = 10, drop_path: float = 0.1) -> MlpMixer:
    """Mixer-S/4 for 32x32 images (the paper's CIFAR Mixer): 512 wide, 8 blocks, token
    MLP 256, channel MLP 2048, 4x4 patches. Input ``(N, 3, 32, 32)``, output
    ``(N, num_classes)``.

    Examples:
        >>> import torch
        >>> from gblr.recipes.models import mixer_small_patch4_32
        >>> with torch.device("meta"):  # shapes only, no memory
        ...     model = mixer_small_patch4_32()
        >>> model(torch.empty(2, 3, 32, 32, device="meta")).shape
        torch.Size([2, 10])
        >>> model.blocks[0].token_mlp.fc1
        Linear(in_features=64, out_features=256, bias=True)
    """
    return MlpMixer(32, 4, 3, num_classes, 512, 8, 0.5, 4.0, drop_path)


# GBLR layers trained from scratch start at this multiple of the budget (at most the dense
# cost). The default block-diagonal start is made at the budget: its blocks are what
# trains best from scratch on the real-task suite, and a start above the budget would
# have the learner cut them down in the ramp (docs/BENCHMARKS.md, "A new default start";
# the learned start it replaced began at 3x, "The start, at a higher cost").
GBLR_START_RATIO = 1.0


def gblr_start_cost(budget: float, start_cost: float | None = None) -> float:
    """The starting cost of GBLR layers trained from scratch to ``budget`` (fractions of
    the dense MACs): ``start_cost`` when given, else ``GBLR_START_RATIO`` times the
    budget, at most 1.

    Examples:
        >>> from gblr.recipes.models import gblr_start_cost
        >>> gblr_start_cost(0.25), gblr_start_cost(0.2, 0.5)
        (0.25, 0.5)
    """
    if start_cost is not None:
        return start_cost
    return min(1.0, GBLR_START_RATIO * budget)


def _conversion_config(
    kind: str,
    budget: float,
    *,
    init: str,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    rank_per_component: int = 1,
    seed: int = 0,
    allocation: str | None = None,
    search_steps: int | None = None,
) -> ConversionConfig:
    """The [`gblr.convert`][] config of a recipe's structure: ``init`` is the recipes'
    ``random`` (from scratch) or ``search`` (fitted to the weights: GBLR's search, a
    family's projection); options the structure's config lacks are left out. The include
    patterns choose the layers (``min_features=1``)."""
    options: dict[str, object] = dict(
        budget=budget, include=include, exclude=exclude, min_features=1, seed=seed
    )
    if allocation is not None:
        options["allocation"] = allocation
    structure = config_class(kind)
    if issubclass(structure, GBLRConfig):
        options.update(init=init, rank_per_component=rank_per_component)
        if init == "search" and search_steps is not None:
            options["search_steps"] = search_steps
    elif issubclass(structure, FamilyConfig):
        fitted = "random" if init == "random" else "project"
        options.update(init=fitted, rank_per_component=rank_per_component)
    return config_from_dict({"structure": kind, **options})


def structure_model(
    model: nn.Module,
    structure: str,
    budget: float,
    *,
    include: str | Sequence[str] = "blocks.*",
    exclude: str | Sequence[str] | None = None,
    rank_per_component: int = 1,
    seed: int = 0,
    structure_init: str = "blockdiag",
    factor_init: str = "fixed_norm",
    full_share: float | None = None,
) -> ConversionReport | None:
    """Make ``model``'s ``include`` linear layers structured, for training from scratch.

    ``"dense"`` leaves the model alone (returns ``None``). ``"gblr"``: GBLR layers at a
    starting cost of ``budget`` (callers pass
    [`gblr_start_cost`][gblr.recipes.models.gblr_start_cost] of their budget) with components of
    rank ``rank_per_component``, started by ``structure_init`` (default ``"blockdiag"``:
    GBLR's block-diagonal special case, one-line strips that make dense diagonal blocks,
    which the default [`gblr.LearnerConfig`][] holds while it learns how far each strip
    reaches and how the MACs split between layers: the start that trained best from
    scratch on the real-task benchmarks, docs/BENCHMARKS.md, "A new default start";
    ``"blocks"`` adds full-width components, a low-rank part (``full_share`` of the start,
    as in ``GBLRLinear.init_structure``; the default until 2026-12-06, at 3x the budget,
    with the paper's σ schedule), ``"half"`` the paper's half-full/half-narrow start) and
    ``factor_init`` (default ``"fixed_norm"``: each component's factors at exactly their
    expected norm, see [`gblr.GBLRLinear`][]); a [`gblr.StructureLearner`][] then moves
    the MACs between layers.
    A baseline family: its largest configuration within ``budget`` in every layer (uniform
    allocation, so ``rank_per_component`` only checks that no layer is narrower). Layers
    matching ``exclude`` (glob patterns over module names, as ``include``) stay dense;
    every pattern must match some linear layer.

    Examples:
        >>> import torch
        >>> from gblr.recipes.models import VisionTransformer, structure_model
        >>> model = VisionTransformer(image_size=8, patch_size=2, dim=32, depth=2)
        >>> report = structure_model(model, "gblr", 0.3)
        >>> type(model.blocks[0].qkv).__name__, len(report.layers)
        ('GBLRLinear', 8)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> structure_model(VisionTransformer(dim=32, depth=2), "dense", 0.3) is None
        True
        >>> model = VisionTransformer(image_size=8, patch_size=2, dim=32, depth=2)
        >>> report = structure_model(
        ...     model, "gblr", 0.3, exclude="blocks.0.*", rank_per_component=2
        ... )
        >>> type(model.blocks[0].qkv).__name__, model.blocks[1].qkv.rank_per_component
        ('Linear', 2)
    """
    if structure == "dense":
        return None
    config = _conversion_config(
        structure,
        budget,
        init="random",
        include=include,
        exclude=exclude,
        allocation="uniform",
        rank_per_component=rank_per_component,
        seed=seed,
    )
    report = convert(model, config)
    if structure == "gblr":
        # convert drew them as its default start; drawn again (the same way, from the same
        # seed) as this call's start says
        from ..compress.convert import start_from_scratch
        from ..learn.groups import gblr_layers

        start_from_scratch(
            [layer for _, layer in gblr_layers(model)],
            budget,
            seed,
            structure_init=structure_init,
            factor_init=factor_init,
            full_share=full_share,
        )
    return report
