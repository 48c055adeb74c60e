"""Development diagnostic (2026-12-06, on a7175f5): the digits Mixer with only its
token-mixing or only its channel-mixing layers structured (the rest dense), GBLR (default
start and learner) or block-diagonal at BUDGET of the structured layers' MACs; prints one
JSON line (collected in runs.jsonl). Run from the repository root:

    python benchmarks/results/realtasks-experiments/mixer-split/mixer_split.py \\
        FAMILY PART SEED BUDGET   # e.g. gblr token 0 0.2
"""

import json
import sys

sys.path.insert(0, "benchmarks")

import torch

import realtask_vision as rv
from gblr.recipes.models import structure_model
from realtask_options import scratch_options

# MACs per image of the Mixer's block layers: token-mixing (16 <-> 32, 64 rows per image)
# and channel-mixing (64 <-> 256, 16 rows per image), all four blocks.
TOKEN_MACS, CHANNEL_MACS = 262144, 2097152


def main() -> None:
    family, part = sys.argv[1], sys.argv[2]
    seed, budget = int(sys.argv[3]), float(sys.argv[4])
    include = {"token": "blocks.*.token_mlp.*", "channel": "blocks.*.channel_mlp.*"}[part]
    torch.set_num_threads(1)
    variant = scratch_options({}, budget, "T1")
    torch.manual_seed(seed)
    model = rv._model("mixer")
    start = variant.start_cost if family == "gblr" else budget
    structure = variant.structure if family == "gblr" else {}
    structure_model(model, family, start, seed=seed, include=include, **structure)
    # The engine's budget spans every block layer: the part's share plus the dense rest.
    if part == "token":
        engine_budget = (budget * TOKEN_MACS + CHANNEL_MACS) / (TOKEN_MACS + CHANNEL_MACS)
    else:
        engine_budget = (budget * CHANNEL_MACS + TOKEN_MACS) / (TOKEN_MACS + CHANNEL_MACS)
    result = rv.fit_digits(model, "mixer", engine_budget, seed, False, variant)
    row = {"family": family, "part": part, "seed": seed, "budget": budget}
    row.update(accuracy=result["accuracy"], macs_ratio=result["macs_ratio"])
    row.update(engine_budget=engine_budget, seconds=result["seconds"])
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
