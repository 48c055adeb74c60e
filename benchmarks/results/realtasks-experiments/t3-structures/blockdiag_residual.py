"""Does a block-diagonal fitted to what the whitened SVD leaves fit MiniLM better than
more SVD components at the same MACs?

For each of the 36 encoder layers of T3 and 0.3 / 0.5 of its MACs: the whitened truncated
SVD for the fraction ``1 - F`` of the MACs, and a block-diagonal of ``k`` diagonal blocks
fitted by whitened least squares to the residual ``W - Ŵ`` with the rest (``k`` the
fewest blocks whose ``m n / k`` entries fit in it; per block of rows ``R`` and columns
``C``: ``B = (W - Ŵ)[R, :] M[:, C] M[C, C]⁻¹``, ``M`` the inputs' second moment on the 128
calibration sentences). ``F = 0`` is the SVD alone (`gblr.convert`'s calibrated start).
Prints the mean relative whitened error ``||(W - Ŵ - B) S||² / ||W S||²`` over the
layers. Run from the repository root (about 20 s on 2 cores):

    PYTHONPATH=src:benchmarks python \\
        benchmarks/results/realtasks-experiments/t3-structures/blockdiag_residual.py

Writes ``blockdiag_residual.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

from gblr.ops.whitened import whitening

sys.path.insert(0, str(Path(__file__).resolve().parent))
from whitened_errors import BUDGETS, encoder_weights_and_moments

FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3)


def block_diagonal_capture(residual: Tensor, moment: Tensor, blocks: int) -> float:
    """Whitened energy that the best ``blocks``-block diagonal captures of ``residual``."""
    m, n = residual.shape
    row_edges = [round(i * m / blocks) for i in range(blocks + 1)]
    col_edges = [round(i * n / blocks) for i in range(blocks + 1)]
    captured = 0.0
    for i in range(blocks):
        rows = slice(row_edges[i], row_edges[i + 1])
        cols = slice(col_edges[i], col_edges[i + 1])
        if rows.start == rows.stop or cols.start == cols.stop:
            continue
        inner = moment[cols, cols]
        ridge = 1e-6 * float(inner.diagonal().mean()) * torch.eye(inner.shape[0]).double()
        block = torch.linalg.solve(inner + ridge, (residual[rows] @ moment[:, cols]).T).T
        captured += float((block @ inner * block).sum())
    return captured


def layer_errors(weight: Tensor, moment: Tensor) -> dict[str, float]:
    """Relative whitened error of each mix, keyed ``budget/fraction``."""
    weight, moment = weight.double(), moment.double()
    factor = whitening(moment)
    whitened = weight @ factor
    total = float(whitened.pow(2).sum())
    left, singular, right = torch.linalg.svd(whitened, full_matrices=False)
    m, n = weight.shape
    errors = {}
    for budget in BUDGETS:
        macs = budget * m * n
        for fraction in FRACTIONS:
            rank = int((1 - fraction) * macs // (m + n))
            captured = float(singular[:rank].pow(2).sum())
            if fraction > 0:
                low_rank = (left[:, :rank] * singular[:rank]) @ right[:rank]
                residual = weight - torch.linalg.solve_triangular(
                    factor, low_rank, upper=False, left=False
                )
                blocks = max(1, -(-(m * n) // int(macs - rank * (m + n))))
                # the ridge-regularised second moment the SVD was whitened with
                captured += block_diagonal_capture(residual, factor @ factor.T, blocks)
            errors[f"{budget}/{fraction}"] = 1.0 - captured / total
    return errors


def main() -> None:
    torch.set_num_threads(2)
    per_layer = {
        name: layer_errors(weight, moment)
        for name, (weight, moment) in encoder_weights_and_moments().items()
    }
    keys = next(iter(per_layer.values())).keys()
    mean = {key: statistics.mean(errors[key] for errors in per_layer.values()) for key in keys}
    for key, value in mean.items():
        print(f"budget/fraction on blocks {key}: {value:.4f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blockdiag_residual.json")
    with open(out + ".tmp", "w") as handle:
        json.dump({"mean_relative_error": mean, "per_layer": per_layer}, handle, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
