"""Multi-GPU (and multi-node) training: Lightning's own strategies, nothing home-made.

Every process holds the whole model; DDP averages the gradients, and the structure
learner then takes the same proximal step on every rank, so the learned widths stay
identical (checked below). On a GPU machine:

    python examples/multi_gpu.py --devices 4 --strategy ddp
    gblr train --config cifar10-vit-s-gblr data.root=~/data --devices 8 --strategy ddp
    gblr train --config cifar10-vit-s-gblr data.root=~/data --devices 8 --num-nodes 2 ...
    python examples/multi_gpu.py --smoke    # 2 CPU processes over gloo (CI)
"""

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import Subset

import gblr
from gblr.recipes.data import digits
from gblr.recipes.engine import EngineConfig, train_classifier
from gblr.recipes.models import VisionTransformer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--strategy", default="ddp")
parser.add_argument("--smoke", action="store_true", help="2 CPU processes, 10 steps")
args = parser.parse_args()


class SaveWidths(pl.Callback):
    """Each rank writes its learned widths at the end, to compare them afterwards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        widths = {n: m.widths.detach().cpu() for n, m in gblr.learn.groups.gblr_layers(module)}
        torch.save(widths, self.folder / f"widths_{trainer.global_rank}.pt")


if __name__ == "__main__":  # spawned processes import this file
    folder = Path(tempfile.mkdtemp())
    train, test = digits()
    torch.manual_seed(0)
    model = VisionTransformer(dim=32, depth=1, heads=2) if args.smoke else VisionTransformer()
    config = gblr.GBLRConfig(budget=0.3, init="random", include="blocks.*", min_features=1)
    gblr.convert(model, config)
    options = dict(accelerator="cpu", devices=2, strategy="ddp_spawn") if args.smoke else dict(
        accelerator="gpu", devices=args.devices, strategy=args.strategy
    )  # fmt: skip
    config = EngineConfig(
        steps=10 if args.smoke else 1500,
        global_batch_size=32 if args.smoke else 256,
        warmup_steps=5 if args.smoke else 500,
        budget=0.3,
        progress=not args.smoke,
        trainer=options,
    )
    result = train_classifier(
        model,
        Subset(train, range(256)) if args.smoke else train,
        test,
        config,
        callbacks=[SaveWidths(folder)],
    )
    ranks = [torch.load(path) for path in sorted(folder.glob("widths_*.pt"))]
    same = all(torch.equal(r[name], ranks[0][name]) for r in ranks for name in ranks[0])
    print(f"{len(ranks)} processes, widths identical on every rank: {same}; {result}")
    assert same and len(ranks) == options["devices"]
