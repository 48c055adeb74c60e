"""How well each kind of GBLR component fits MiniLM's encoder layers at equal MACs.

The calibrated conversion (T3) fits every layer by the whitened truncated SVD: full-width
components, a low-rank layer. GBLR could spend the same MACs on components that cover only
a band of output rows (one attention head's 32 rows of a query, key or value projection,
or a quarter of a layer's outputs), which cost ``in + rows`` each instead of ``in + out``.
For each of the 36 encoder layers this prints the relative output error
``||(W - Ŵ) S||² / ||W S||²`` (``S Sᵀ`` the second moment of the layer's inputs on the
128 calibration sentences of T3) of the best fit of each kind at 0.3 and 0.5 of the
layer's MACs:

- ``full``: the whitened truncated SVD (what `gblr.convert` does with ``calibration=``);
- ``rows-P``: the outputs cut into ``P`` equal bands, each band's own whitened SVD, the
  components of all bands taken in order of the energy they capture until the MACs are
  spent (the best fit of that kind: every band component costs the same);
- ``mixed-F-P``: full components for the fraction ``F`` of the MACs, then band components
  (``P`` bands) fitted to what they leave.

Run from the repository root (about 30 s on 2 cores; loads the model and sentences as T3
does):

    PYTHONPATH=src:benchmarks python \\
        benchmarks/results/realtasks-experiments/t3-structures/whitened_errors.py

Writes ``whitened_errors.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import statistics

import torch
from torch import Tensor

import realtask_pretrained as t3
from gblr.compress.calibrate import input_second_moments
from gblr.ops.whitened import whitening

BUDGETS = (0.3, 0.5)
BANDS = (2, 4, 12)
MIXED = ((0.25, 4), (0.5, 4), (0.75, 4), (0.75, 12))


def _captured(bands: list[Tensor], unit_cost: int, macs: float) -> float:
    """Energy of the best ``floor(macs / unit_cost)`` components over the bands."""
    energies = torch.cat([torch.linalg.svdvals(band).pow(2) for band in bands])
    count = int(macs // unit_cost)
    return float(energies.sort(descending=True).values[:count].sum())


def layer_errors(weight: Tensor, moment: Tensor) -> dict[str, dict[str, float]]:
    """Relative whitened error of each fit, per budget."""
    whitened = weight.double() @ whitening(moment)
    m, n = whitened.shape
    total = float(whitened.pow(2).sum())
    left, singular, right = torch.linalg.svd(whitened, full_matrices=False)
    errors: dict[str, dict[str, float]] = {}
    for budget in BUDGETS:
        macs = budget * m * n
        row = {"full": _captured([whitened], m + n, macs)}
        for bands in BANDS:
            split = list(whitened.split(m // bands))
            row[f"rows-{bands}"] = _captured(split, n + m // bands, macs)
        for fraction, bands in MIXED:
            k = int(fraction * macs // (m + n))
            residual = whitened - (left[:, :k] * singular[:k]) @ right[:k]
            rest = macs - k * (m + n)
            captured = float(singular[:k].pow(2).sum())
            row[f"mixed-{fraction}-{bands}"] = captured + _captured(
                list(residual.split(m // bands)), n + m // bands, rest
            )
        errors[str(budget)] = {name: 1.0 - value / total for name, value in row.items()}
    return errors


def encoder_weights_and_moments() -> dict[str, tuple[Tensor, Tensor]]:
    """Each of MiniLM's 36 encoder linear layers by name: ``(weight, second moment of its
    inputs on T3's 128 calibration sentences)``, as T3 computes them."""
    path, encoded = t3._setup()
    model = t3._load_encoder(path)
    train = encoded["train"]
    calibration = [
        t3._trimmed({k: v[i : i + 32] for k, v in train.items()})
        for i in range(0, t3.CALIBRATION_SENTENCES, 32)
    ]
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder.layer")
    }
    moments = input_second_moments(model, layers, calibration)
    return {name: (module.weight.detach(), moments[name]) for name, module in layers.items()}


def main() -> None:
    torch.set_num_threads(2)
    per_layer = {
        name: layer_errors(weight, moment)
        for name, (weight, moment) in encoder_weights_and_moments().items()
    }
    kinds = {
        "query/key/value": ("query", "key", "value"),
        "attention output": ("attention.output",),
        "intermediate": ("intermediate",),
        "output": tuple(f"layer.{index}.output" for index in range(6)),
    }
    summary = {}
    for budget in map(str, BUDGETS):
        fits = per_layer[next(iter(per_layer))][budget]
        summary[budget] = {
            "all layers": {
                f: statistics.mean(e[budget][f] for e in per_layer.values()) for f in fits
            },
            **{
                kind: {
                    f: statistics.mean(
                        e[budget][f]
                        for name, e in per_layer.items()
                        if any(part + "." in name + "." for part in parts)
                        and not (kind == "output" and "attention" in name)
                    )
                    for f in fits
                }
                for kind, parts in kinds.items()
            },
        }
    for budget, table in summary.items():
        print(budget)
        for kind, fits in table.items():
            print(f"  {kind:17s}", " ".join(f"{f}={v:.4f}" for f, v in fits.items()))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "whitened_errors.json")
    with open(out + ".tmp", "w") as handle:
        json.dump({"mean_relative_error": summary, "per_layer": per_layer}, handle, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
