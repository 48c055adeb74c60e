"""Quickstart: train a small vision transformer whose linear layers are GBLR matrices,
learn their structure down to 30% of the dense MACs, then freeze, plan, save and load it.

    python examples/quickstart.py            # about a minute on 2 CPU cores
    python examples/quickstart.py --smoke    # a few seconds (CI)
"""

import argparse
import tempfile
from pathlib import Path

import torch

import gblr
from gblr.recipes.data import digits
from gblr.recipes.models import VisionTransformer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--smoke", action="store_true", help="a few steps only")
args = parser.parse_args()
steps = 40 if args.smoke else args.steps

# 1. Data that ships with scikit-learn (8x8 digits) and a model with dense linear layers.
torch.manual_seed(0)
train, test = digits()
model = VisionTransformer()  # 4 blocks; qkv, proj, fc1, fc2 in each

# 2. Every linear layer of the blocks becomes a GBLR layer at 30% of its MACs, started as
#    the recipes start from scratch: GBLR's block-diagonal special case at the budget.
#    (A start far above the budget, pruned in a short warm-up, can end at chance: this
#    script started at 3x the budget until 2026-12-06 and ended at 0.087.)
config = gblr.GBLRConfig(budget=0.3, init="random", include="blocks.*", min_features=1)
gblr.convert(model, config)

# 3. Train: widths and locations are parameters too (at the weights' learning rate unless
#    told); the learner holds the MACs at 30% and learns where they go.
optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=2e-3, weight_decay=0.05))
learner = gblr.StructureLearner(model, budget=0.3, total_steps=steps, warmup_steps=steps // 3)
loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
step = 0
while step < steps:
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()  # held sides restored, proximal step on the widths, budget projection
        step += 1
        if step == steps:
            break
print(learner.summary())

# 4. Evaluate with exact boxcar masks (eval mode) and count the MACs.
model.eval()
images, labels = test.tensors
with torch.no_grad():
    reference = model(images)
print(f"test accuracy {(reference.argmax(-1) == labels).float().mean():.3f}")
print(gblr.count_flops(model, include=["blocks.*"]))

# 5. Deploy: freeze into the exact inference form, pick the fastest plan per layer, save.
frozen = gblr.freeze(model)
print(gblr.plan(frozen, images[:256]))
with torch.no_grad():
    assert torch.allclose(frozen(images), reference, rtol=1e-4, atol=1e-5)
folder = Path(tempfile.mkdtemp())
gblr.save(frozen, folder / "vit-gblr.safetensors")

# 6. Load it back: the factory builds the architecture, the file fills in the GBLR layers.
loaded = gblr.load(folder / "vit-gblr.safetensors", model_factory=VisionTransformer)
with torch.no_grad():
    assert torch.allclose(loaded(images), reference, rtol=1e-4, atol=1e-5)
print(f"saved and reloaded {folder / 'vit-gblr.safetensors'}: same outputs")
