"""T1 of the real-task suite (benchmarks/realtasks.py): from scratch, vision.

scikit-learn's bundled 8x8 handwritten digits (1,348 training / 449 test images, the
split of seed 0 for every run), a 4-block ViT (dim 64, 2x2 patches, as ``gblr demo``), a
4-block MLP-Mixer (dim 64, 2x2 patches: 16 tokens, token MLP 32, channel MLP 256), or a
pixel MLP (256 -> 512 -> 512 -> 10, no normalisation layer) on the digits upsampled to
16x16 with noise (``t1-mlp``) or placed at random offsets of a 16x16 canvas
(``t1-mlp-shift``). The blocks' linear layers (the MLP's two hidden layers) are dense,
GBLR or a baseline family at the budget; patch embedding and classifier stay dense.
Training as ``gblr demo``: the library's engine, AdamW over ``gblr.param_groups`` (lr
2e-3, weight decay 0.05), warm-up over the first third and cosine decay, batch 64; the
seed sets the initialisation and the data order. GBLR runs with the library's defaults
for training from scratch (``structure_model`` and the engine's structure learner),
changed only by a variant's options.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import warnings
from typing import Any

STEPS = 800
QUICK_STEPS = 3
LR = 2e-3

# GBLR options a variant may set, and where they go: the engine's, and the learner's (at
# the top level or under "learner", in the keys of a recipe's learner section).
_ENGINE_OPTIONS = ("structure_lr", "sigma_start_step")
_LEARNER_OPTIONS = ("sigma", "sigma_schedule")


@functools.cache
def _data() -> tuple[Any, Any]:
    from gblr.recipes.data import digits

    return digits(seed=0)


MLP_HIDDEN = 512
CANVAS = 16


@functools.cache
def _upsampled_data() -> tuple[Any, Any]:
    """The digits upsampled to 16x16 (bilinear) with Gaussian pixel noise (std 0.5,
    seed 0): 256 pixels of which neighbours are alike."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    datasets = []
    for dataset in _data():
        images, labels = dataset.tensors
        large = torch.nn.functional.interpolate(
            images, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False
        )
        large = large + 0.5 * torch.randn(large.shape, generator=generator)
        datasets.append(TensorDataset((large - large.mean()) / large.std(), labels))
    return datasets[0], datasets[1]


@functools.cache
def _shifted_data() -> tuple[Any, Any]:
    """The digits placed at a random offset of a 16x16 canvas (the offset drawn once per
    image, seed 0, train and test alike) with Gaussian pixel noise (std 0.25): a dense
    MLP on the 256 pixels has to learn every position anew from 1,348 images, so
    locality matters, as in images larger than 8x8."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    datasets = []
    for dataset in _data():
        images, labels = dataset.tensors
        count = images.shape[0]
        canvas = torch.zeros(count, 1, CANVAS, CANVAS)
        offsets = torch.randint(0, CANVAS - 8 + 1, (count, 2), generator=generator)
        for index, (row, col) in enumerate(offsets.tolist()):
            canvas[index, :, row : row + 8, col : col + 8] = images[index] - images.min()
        canvas = canvas + 0.25 * torch.randn(canvas.shape, generator=generator)
        canvas = (canvas - canvas.mean()) / canvas.std()
        datasets.append(TensorDataset(canvas, labels))
    return datasets[0], datasets[1]


def _mlp():
    """Pixels (flattened 8x8, row by row) -> 256 -> 256 -> 10 with GELU; the two hidden
    layers are ``blocks.0`` and ``blocks.1`` (the layers the suite structures), the
    classifier is ``head``. Nearby input columns are nearby pixels: the task rewards
    local mixing, as a block-diagonal matrix gives it."""
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

    from gblr.learn.config import LearnerConfig, config_from_options
    from gblr.recipes.engine import EngineConfig, train_classifier
    from gblr.recipes.models import gblr_start_cost, structure_model

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if model_name == "mlp-shift":
        train, test = _shifted_data()
    elif model_name == "mlp":
        train, test = _upsampled_data()
    else:
        train, test = _data()
    steps = QUICK_STEPS if quick else STEPS
    options = dict(options)
    ratio = options.pop("start_cost_ratio", None)
    start_cost = gblr_start_cost(budget, None if ratio is None else min(1.0, ratio * budget))
    structure_options = options.pop("structure", {})
    engine_options = {name: options.pop(name) for name in _ENGINE_OPTIONS if name in options}
    learner_options = {name: options.pop(name) for name in _LEARNER_OPTIONS if name in options}
    learner_options.update(options.pop("learner", {}))
    # LearnerConfig fields that have no deprecated keyword (e.g. exact_from).
    learner_fields = options.pop("learner_config", {})
    if options:
        raise ValueError(f"unknown GBLR options for T1: {sorted(options)}")
    torch.manual_seed(seed)
    model = _model(model_name)
    structure_model(
        model,
        structure,
        start_cost if structure == "gblr" else budget,
        seed=seed,
        **structure_options,
    )
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = EngineConfig(
            steps=steps,
            lr=LR,
            warmup_steps=steps // 3,
            budget=budget,
            # The library's default final phase, unless a variant sets its own.
            learner=dataclasses.replace(
                config_from_options(learner_options),
                **{"exact_from": LearnerConfig().exact_from, **learner_fields},
            ),
            out_dir=folder,
            seed=seed,
            progress=False,
            logger=None,
            trainer={"accelerator": "cpu"},
            **engine_options,
        )
        result = train_classifier(model, train, test, config)
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
    }


def run_t1_vit(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("vit", structure, budget, seed, quick, options)


def run_t1_mlp(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mlp", structure, budget, seed, quick, options)


def run_t1_mlp_shift(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mlp-shift", structure, budget, seed, quick, options)


def run_t1_mixer(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    return train_digits("mixer", structure, budget, seed, quick, options)
