"""Development timing (not a library form): what a windowed training form could save on
the pixel MLP's 512 x 512 layer at the default start (batch 64, one thread).

The layer's current training step (held strips: a gather of the input's columns, then
the long side masked at full length and multiplied) against a prototype whose long side
is gathered, masked and differentiated only over each strip's window (its reach plus
``MARGIN`` lines on each side, the edge kernel cut there as in ``edge-window.patch``),
then scattered into the full-length factor for the product. The prototype's width
gradient is only shaped like the library's (timing, not numbers).

    OMP_NUM_THREADS=1 python benchmarks/results/realtasks-experiments/edge-window/window_form.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import gblr
import realtask_vision
from gblr.recipes.models import gblr_start_cost, structure_model

MARGIN = 8


class _WindowMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, factor, starts, lengths, edge):  # type: ignore[override]
        k, r, n = factor.shape
        window = min(n, int(lengths.max()) + 2 * MARGIN)
        offsets = torch.arange(window) - MARGIN
        index = torch.remainder(starts[:, None] + offsets, n).unsqueeze(1).expand(k, r, window)
        inside = ((offsets >= 0) & (offsets < lengths[:, None])).to(factor.dtype).unsqueeze(1)
        gathered = factor.gather(2, index)
        out = factor.new_zeros(k, r, n).scatter_(2, index, gathered * inside)
        at_end = torch.remainder(offsets[None, :] - lengths[:, None], n)
        ctx.save_for_backward(index, inside, gathered, at_end, edge)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        index, inside, gathered, at_end, edge = ctx.saved_tensors
        grad_window = grad.gather(2, index)
        grad_factor = torch.zeros_like(grad).scatter_(2, index, grad_window * inside)
        grad_mask = (grad_window * gathered).sum(1)
        grad_length = (grad_mask * edge[at_end]).sum(1)
        return grad_factor, None, grad_length, None


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = realtask_vision._mlp()
    structure_model(model, "gblr", gblr_start_cost(0.1), seed=0)
    learner = gblr.StructureLearner(model, budget=0.1, total_steps=300, warmup_steps=100)
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=2e-3), fused=True)
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    for _ in range(150):  # past the budget's ramp
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        learner.step()
    layer = model.blocks[1]
    side, _masked, values, lines = layer.strips()
    assert side == 0, side
    factor = layer.U.detach().clone().requires_grad_(True)  # (K, r, out), the long side
    lengths = torch.round(layer.widths.detach()[1].clamp(0, 1) * layer.out_features).long()
    starts = torch.floor(layer.locations.detach()[1].remainder(1) * layer.out_features).long()
    edge = torch.randn(layer.out_features)
    entries = values.detach().clone().requires_grad_(True)
    inputs = torch.randn(64, layer.in_features)
    print(
        "K", factor.shape[0], "reach: mean", float(lengths.float().mean()), "max",
        int(lengths.max()), "of", layer.out_features,
    )  # fmt: skip

    def library() -> None:
        layer(inputs).sum().backward()

    def windowed() -> None:
        long_side = _WindowMask.apply(factor, starts, lengths, edge).reshape(-1, factor.shape[2])
        hidden = inputs.index_select(-1, lines) * entries
        torch.nn.functional.linear(hidden, long_side.t(), layer.bias).sum().backward()

    samples: dict[str, list[float]] = {"library_ms": [], "windowed_ms": []}
    for _ in range(15):  # alternating, so both see the same machine
        for name, form in (("library_ms", library), ("windowed_ms", windowed)):
            start = time.perf_counter()
            for _ in range(20):
                form()
            samples[name].append((time.perf_counter() - start) / 20 * 1e3)
    print({name: round(statistics.median(values), 3) for name, values in samples.items()})


if __name__ == "__main__":
    main()
