"""T1 of the real-task suite (benchmarks/realtasks.py): from scratch, vision.

scikit-learn's bundled 8x8 handwritten digits (1,348 training / 449 test images, the
split of seed 0 for every run), a 4-block ViT (dim 64, 2x2 patches, as ``gblr demo``), a
4-block MLP-Mixer (dim 64, 2x2 patches: 16 tokens, token MLP 32, channel MLP 256), or a
pixel MLP (256 -> 512 -> 512 -> 10, no normalisation layer) on the digits upsampled to
16x16 with noise (``t1-mlp``; ``t1-mlp-few``: more noise and 300 training images) or
placed at random offsets of a 16x16 canvas (``t1-mlp-shift``), or upsampled as ``t1-mlp``
with the 256 pixels in one fixed random order (``t1-mlp-perm``: no neighbouring inputs are
alike, as in tabular data). The blocks' linear layers
(the MLP's two hidden layers) are dense, GBLR or a baseline family at the budget; patch
embedding and classifier stay dense.
Training as ``gblr demo``: the library's engine, AdamW over ``gblr.param_groups`` (lr
2e-3, weight decay 0.05), warm-up over the first third and cosine decay, batch 64; the
seed sets the initialisation and the data order. GBLR runs with the library's defaults
for training from scratch (``structure_model`` and the engine's structure learner),
changed only by a variant's options.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import warnings
from typing import Any

from realtask_options import scratch_options

STEPS = 800
QUICK_STEPS = 3
LR = 2e-3


@functools.cache
def _data() -> tuple[Any, Any]:
    from gblr.recipes.data import digits

    return digits(seed=0)


MLP_HIDDEN = 512
CANVAS = 16


def _digits_on_canvas(place: Any, noise: float) -> tuple[Any, Any]:
    """The digits as 16x16 images, ``place(images, generator)`` putting each ``(N, 1, 8,
    8)`` batch on the canvas, plus Gaussian pixel noise of std ``noise``, standardized;
    one generator seeded 0 draws everything, train set first."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    datasets = []
    for dataset in _data():
        images, labels = dataset.tensors
        canvas = place(images, generator)
        canvas = canvas + noise * torch.randn(canvas.shape, generator=generator)
        datasets.append(TensorDataset((canvas - canvas.mean()) / canvas.std(), labels))
    return datasets[0], datasets[1]


def _upsample(images: Any, generator: Any) -> Any:
    """``(N, 1, 8, 8)`` digits bilinearly upsampled to the whole canvas (a `place` of
    `_digits_on_canvas`; draws nothing)."""
    import torch

    return torch.nn.functional.interpolate(
        images, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False
    )


@functools.cache
def _upsampled_data() -> tuple[Any, Any]:
    """The digits upsampled to 16x16 (bilinear) with pixel noise of std 0.5: 256 pixels
    of which neighbours are alike."""
    return _digits_on_canvas(_upsample, 0.5)


FEW_IMAGES = 300


@functools.cache
def _few_data() -> tuple[Any, Any]:
    """The digits upsampled to 16x16 as `_upsampled_data`, with pixel noise of std 1.0,
    and only ``FEW_IMAGES`` training images (a subset drawn once with seed 0; the test
    set stays whole): every family fits the training set, and what it generalizes from
    decides."""
    import torch
    from torch.utils.data import TensorDataset

    train, test = _digits_on_canvas(_upsample, 1.0)
    images, labels = train.tensors
    subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    subset = subset[:FEW_IMAGES]
    return TensorDataset(images[subset], labels[subset]), test


@functools.cache
def _shifted_data() -> tuple[Any, Any]:
    """The digits at a random offset of a 16x16 canvas (drawn once per image) with pixel
    noise of std 0.25: a dense MLP on the 256 pixels has to learn every position anew
    from 1,348 images."""
    import torch

    def shift(images: Any, generator: Any) -> Any:
        count = images.shape[0]
        canvas = torch.zeros(count, 1, CANVAS, CANVAS)
        offsets = torch.randint(0, CANVAS - 8 + 1, (count, 2), generator=generator)
        for index, (row, col) in enumerate(offsets.tolist()):
            canvas[index, :, row : row + 8, col : col + 8] = images[index] - images.min()
        return canvas

    return _digits_on_canvas(shift, 0.25)


@functools.cache
def _permuted_data() -> tuple[Any, Any]:
    """`_upsampled_data` with the 256 pixels of every image in one fixed random order
    (drawn with seed 0, the same for train and test): the same information as ``t1-mlp``,
    none of it in which inputs are neighbours. A dense layer, and low-rank, are indifferent
    to the order; a structure that groups neighbouring inputs is not."""
    import torch
    from torch.utils.data import TensorDataset

    order = torch.randperm(CANVAS * CANVAS, generator=torch.Generator().manual_seed(0))
    permuted = []
    for dataset in _upsampled_data():
        images, labels = dataset.tensors
        flat = images.flatten(1)[:, order]
        permuted.append(TensorDataset(flat.reshape(images.shape), labels))
    return permuted[0], permuted[1]


def _mlp():
    """Pixels (a 16x16 canvas flattened row by row) -> 512 -> 512 -> 10 with GELU, no
    normalisation layer; the two hidden layers are ``blocks.0`` and ``blocks.1`` (the
    layers the suite structures), the classifier is ``head``."""
    from torch import nn

    class PixelMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Linear(CANVAS * CANVAS, MLP_HIDDEN), nn.Linear(MLP_HIDDEN, MLP_HIDDEN)]
            )
            self.head = nn.Linear(MLP_HIDDEN, 10)

        def forward(self, images):
            x = images.flatten(1)
            for layer in self.blocks:
                x = nn.functional.gelu(layer(x))
            return self.head(x)

    return PixelMlp()


def _model(name: str):
    from gblr.recipes.models import MlpMixer, VisionTransformer

    if name.startswith("mlp"):
        return _mlp()
    if name == "vit":
        return VisionTransformer(image_size=8, patch_size=2, in_chans=1, dim=64, depth=4)
    return MlpMixer(image_size=8, patch_size=2, in_chans=1, dim=64, depth=4)


def train_digits(
    model_name: str, structure: str, budget: float, seed: int, quick: bool, options: dict
) -> dict[str, Any]:
    """One run; returns ``accuracy`` (test top-1), ``macs_ratio``, ``seconds``."""
    import torch

    from gblr.recipes.models import structure_model

    variant = scratch_options(options, budget, "T1")
    torch.manual_seed(seed)
    model = _model(model_name)
    if variant.probe is not None and structure == "gblr":
        return fit_digits(model, model_name, budget, seed, quick, variant)
    structure_model(
        model,
        structure,
        variant.start_cost if structure == "gblr" else budget,
        seed=seed,
        **variant.structure,
    )
    return fit_digits(model, model_name, budget, seed, quick, variant)


def engine_config(steps: int, budget: float, seed: int, variant: Any, folder: Any) -> Any:
    """The engine's config of a T1 run of ``steps`` at ``budget`` (``variant`` a
    ``ScratchOptions``), writing into ``folder``."""
    from gblr.recipes.engine import EngineConfig

    return EngineConfig(
        steps=steps,
        lr=LR,
        warmup_steps=steps // 3,
        budget=budget,
        learner=variant.learner,
        out_dir=folder,
        seed=seed,
        progress=False,
        logger=None,
        trainer={"accelerator": "cpu"},
        **variant.engine,
    )


def fit_digits(
    model: Any, model_name: str, budget: float, seed: int, quick: bool, variant: Any
) -> dict[str, Any]:
    """Train an already structured ``model`` (of `_model` ``model_name``) on its digits data
    with the engine at ``budget`` of its structured layers' MACs, ``variant`` a
    ``ScratchOptions``; returns ``accuracy``, ``test_loss``, ``macs_ratio``, ``seconds``,
    ``steps``."""
    import torch

    from gblr.recipes.engine import train_classifier

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = {
        "mlp": _upsampled_data,
        "mlp-few": _few_data,
        "mlp-shift": _shifted_data,
        "mlp-perm": _permuted_data,
    }.get(model_name, _data)
    train, test = data()
    steps = QUICK_STEPS if quick else STEPS
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = engine_config(steps, budget, seed, variant, folder)
        if variant.probe is None:
            result = train_classifier(model, train, test, config)
        else:  # the model is still dense: the probe structures it
            result = _train_probing_start(model, train, test, config, variant)
    # The test cross-entropy moves less by chance than the accuracy of 449 images.
    images, labels = test.tensors
    model.eval()
    with torch.no_grad():
        test_loss = float(torch.nn.functional.cross_entropy(model(images), labels))
    return {
        "accuracy": result["accuracy"],
        "test_loss": test_loss,
        "macs_ratio": result["macs_ratio"],
        "seconds": result["seconds"],
        "steps": steps,
        **{key: result[key] for key in ("start", "probe_seconds", "probe") if key in result},
    }


def _train_probing_start(model: Any, train: Any, test: Any, config: Any, variant: Any) -> dict:
    """``gblr.recipes.start_probe.train_classifier_probing_start`` between the start that
    ``variant`` describes (its structure keywords, starting cost and learner) and the
    learned start."""
    import dataclasses

    from gblr.recipes.start_probe import (
        LEARNED_START,
        GBLRStart,
        StartProbe,
        train_classifier_probing_start,
    )

    assert config.budget is not None
    options = {"structure_init": "blockdiag", "factor_init": "fixed_norm", **variant.structure}
    unknown = set(options) - {"structure_init", "factor_init"}
    if unknown:
        raise ValueError(f"a probing variant takes no structure keywords {sorted(unknown)}")
    incumbent = GBLRStart(
        "given",
        start_cost_ratio=variant.start_cost / config.budget,
        learner=variant.learner,
        **options,
    )
    return train_classifier_probing_start(
        model,
        train,
        test,
        dataclasses.replace(config, learner=None),
        starts=(incumbent, LEARNED_START),
        probe=StartProbe(**variant.probe),
    )


def run_t1_vit(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("vit", structure, budget, seed, quick, options)


def run_t1_mlp(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mlp", structure, budget, seed, quick, options)


def run_t1_mlp_few(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mlp-few", structure, budget, seed, quick, options)


def run_t1_mlp_shift(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mlp-shift", structure, budget, seed, quick, options)


def run_t1_mlp_perm(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mlp-perm", structure, budget, seed, quick, options)


def run_t1_mixer(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mixer", structure, budget, seed, quick, options)
