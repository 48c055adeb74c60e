"""The figures of the Concepts guide, drawn from the library itself.

1. The Gaudi mask of one interval at several bandwidths σ, next to the exact boxcar.
2. The special cases as GBLR matrices: low-rank, block-low-rank (Monarch without its
   permutations), block-diagonal and block-sparse, each drawn as its components' boxes
   (row interval x column interval), with the MACs the library counts for it.

    python examples/concepts_figures.py --out docs/figures
    python examples/concepts_figures.py --smoke          # into a temporary folder (CI)
"""

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import gblr

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="docs/figures")
parser.add_argument("--smoke", action="store_true", help="write to a temporary folder")
args = parser.parse_args()
out = Path(tempfile.mkdtemp() if args.smoke else args.out)
out.mkdir(parents=True, exist_ok=True)

# 1. Gaudi masks: width 0.25 of n = 64 starting at 0.875, so the interval wraps around.
n = 64
width, location = torch.tensor([0.25], dtype=torch.float64), torch.tensor([0.875])
figure, axes = plt.subplots(figsize=(7, 3))
for sigma in (1.0, 4.0, 16.0, 100.0):
    mask = gblr.gaudi_mask(width, location.double(), n, sigma=sigma)[0]
    axes.plot(mask.numpy(), label=f"σ = {sigma:g}")
exact = gblr.boxcar_mask(width, location.double(), n)[0]
axes.step(range(n), exact.numpy(), "k--", where="mid", label="boxcar (σ = ∞)")
axes.set_xlabel("row or column index")
axes.set_ylabel("mask")
axes.set_title("Gaudi mask of a wrapped interval (width 16 of 64, start 56)")
axes.legend(fontsize=8)
figure.savefig(out / "gaudi_mask_sigma.png", dpi=110, bbox_inches="tight")
plt.close(figure)


def draw_components(ax, layer: gblr.GBLRLinear, size: int) -> None:
    """One outlined rectangle per live component (row interval x column interval, eval
    mode), nested by a small inset per overlapping component so stacks stay visible."""
    from matplotlib.patches import Rectangle

    (col_len, row_len), (col_start, row_start) = layer.interval_lengths(), layer.interval_starts()
    colours = plt.get_cmap("tab10")
    seen: dict[tuple[int, int, int, int], int] = {}
    for k in torch.nonzero(layer.live_mask()).flatten().tolist():
        box = (int(row_start[k]), int(row_len[k]), int(col_start[k]), int(col_len[k]))
        depth = seen.get(box, 0)
        seen[box] = depth + 1
        inset = 1.5 * depth
        for r0 in (box[0], box[0] - size):  # a wrapped interval is drawn as two pieces
            for c0 in (box[2], box[2] - size):
                ax.add_patch(
                    Rectangle(
                        (c0 - 0.5 + inset, r0 - 0.5 + inset),
                        max(box[3] - 2 * inset, 0.3),
                        max(box[1] - 2 * inset, 0.3),
                        fill=True, alpha=0.25, edgecolor=colours(k % 10),
                        facecolor=colours(k % 10), linewidth=1.2,
                    )
                )  # fmt: skip
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_aspect("equal")


# 2. The special cases on a 48 x 48 matrix.
torch.manual_seed(0)
m = 48
cases = {
    "low-rank (rank 4)": gblr.special.low_rank(torch.randn(m, 4), torch.randn(4, m)),
    "block-low-rank (4 x 4 grid)": gblr.special.block_low_rank(torch.randn(m, m), 4),
    "block-diagonal (4 blocks)": gblr.special.block_diagonal([torch.randn(12, 12)] * 4),
    "block-sparse (12 x 12 tiles)": gblr.special.block_sparse(
        torch.randn(m, m) * (torch.rand(4, 4) < 0.3).repeat_interleave(12, 0)
        .repeat_interleave(12, 1), 12,
    ),
}  # fmt: skip
figure, axes = plt.subplots(1, len(cases), figsize=(3.4 * len(cases), 4.0))
for ax, (title, layer) in zip(axes, cases.items()):
    draw_components(ax, layer.eval(), m)
    ax.set_title(
        f"{title}\n{layer.live_components()} components\n{layer.flops()} MACs/row "
        f"(dense {m * m})",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
figure.suptitle("Special cases as GBLR matrices: each component's row x column interval")
figure.savefig(out / "special_cases.png", dpi=110, bbox_inches="tight")
plt.close(figure)
print(f"wrote {out / 'gaudi_mask_sigma.png'} and {out / 'special_cases.png'}")
