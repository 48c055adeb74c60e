"""Input orders read from data for the block-diagonal start (not wired into any default).

The block-diagonal start (``structure_init="blockdiag"``) puts its one-line strips on the
input lines ``0, 1, 2, ...`` block by block, so each diagonal block mixes *adjacent*
inputs. Where adjacency means nothing (features in an arbitrary order: permuted pixels,
tabular columns), the strips can sit on the lines of an order read from the inputs'
correlations instead: the same start, the same cost, other strip locations. On the
permuted-pixel MLP of the real-task suite that order gained 1.06 and 0.47 points at 0.1 and
0.2 of the MACs over twenty seeds, and the rule here (keep the given order where it
already groups correlated inputs) leaves every other pixel task's order as it is
(docs/BENCHMARKS.md, "Inputs ordered by their correlations").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.gaudi import interval_lengths, interval_starts
from .linear import GBLRLinear

__all__ = ["adjacent_correlation", "correlation_chain", "order_strips_by_inputs"]


def _correlations(inputs: Tensor) -> Tensor:
    """``(d, d)`` float64 correlation matrix of the ``(N, d)`` samples ``inputs`` (a feature
    that never varies is correlated with nothing)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() != 2 or inputs.shape[0] < 2 or inputs.shape[1] < 2:
        raise ValueError(
            "inputs must be (samples, features) with at least 2 of each, got shape "
            f"{tuple(inputs.shape)}"
        )
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs must be finite (found NaN or infinite values)")
    centred = inputs.detach().double()
    centred = centred - centred.mean(0)
    moment = centred.T @ centred
    scale = moment.diagonal().sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    similarity = moment / scale[:, None] / scale[None, :]
    return similarity.fill_diagonal_(0.0)


def correlation_chain(inputs: Tensor) -> Tensor:
    """An order of the features in which neighbours are correlated: of the greedy chains
    from every feature (each step to the unvisited feature most correlated with the last),
    the one whose neighbours' correlations sum highest. It does not depend on the order
    the features come in: permuting the columns of ``inputs`` permutes the result alike.

    Args:
        inputs: ``(N, d)`` samples of ``d`` features, ``N, d >= 2``, finite.

    Returns:
        ``(d,)`` int64: the features in chain order.

    Examples:
        >>> import torch
        >>> from gblr.layers.input_order import correlation_chain
        >>> noise = torch.randn(200, 44)
        >>> smooth = sum(noise[:, k : k + 40] for k in range(5))  # neighbours alike
        >>> shuffle = torch.randperm(40)
        >>> order = correlation_chain(smooth[:, shuffle])
        >>> lines = shuffle[order]  # the original feature at each place of the chain
        >>> bool((lines[1:] - lines[:-1]).abs().float().mean() < 3)
        True
    """
    return _best_chain(_correlations(inputs))


def _best_chain(similarity: Tensor) -> Tensor:
    """`correlation_chain` of the ``(d, d)`` correlations ``similarity`` (zero diagonal)."""
    size = similarity.shape[0]
    starts = torch.arange(size)
    visited = torch.zeros(size, size, dtype=torch.bool)
    visited[starts, starts] = True
    chains, current = [starts], starts
    score = torch.zeros(size, dtype=torch.float64)
    for _ in range(size - 1):
        row = similarity[current].masked_fill(visited, float("-inf"))
        value, following = row.max(1)
        score += value
        visited[starts, following] = True
        chains.append(following)
        current = following
    return torch.stack(chains, 1)[int(score.argmax())]


def adjacent_correlation(inputs: Tensor, order: Tensor | None = None) -> float:
    """Mean correlation of neighbouring features in ``order`` (default: as given).

    Args:
        inputs: ``(N, d)`` samples, ``N, d >= 2``, finite.
        order: ``(d,)`` a permutation of the features, or ``None``.

    Returns:
        The mean over the ``d - 1`` neighbouring pairs.

    Examples:
        >>> import torch
        >>> from gblr.layers.input_order import adjacent_correlation
        >>> noise = torch.randn(200, 44)
        >>> smooth = sum(noise[:, k : k + 40] for k in range(5))
        >>> adjacent_correlation(smooth) > 0.6 > adjacent_correlation(smooth[:, torch.randperm(40)])
        True
    """
    similarity = _correlations(inputs)
    size = similarity.shape[0]
    order = torch.arange(size) if order is None else torch.as_tensor(order)
    if sorted(order.tolist()) != list(range(size)):
        raise ValueError(f"order must be a permutation of the {size} features")
    return _adjacent(similarity, order)


def _adjacent(similarity: Tensor, order: Tensor) -> float:
    """`adjacent_correlation` of the ``(d, d)`` correlations ``similarity``."""
    return float(similarity[order[:-1], order[1:]].mean())


def order_strips_by_inputs(layer: GBLRLinear, inputs: Tensor, *, keep_ratio: float = 0.5) -> bool:
    """Move a start's one-line input strips onto the lines of
    [`correlation_chain`][gblr.layers.input_order.correlation_chain] of ``inputs``, unless
    the inputs' own order already groups correlated inputs: its neighbours' mean
    correlation at least ``keep_ratio`` times the chain's.

    The strip on input line ``j`` moves to line ``order[j]`` with its factor entry, so the
    layer's weight is the same with its columns permuted: ``W_after[:, order] ==
    W_before``. Components that are not one input line wide are left as they are. Call it
    before a [`gblr.StructureLearner`][] is built on the layer (the learner reads the
    structure it starts from).

    Args:
        layer: a [`gblr.GBLRLinear`][] (typically at its block-diagonal start).
        inputs: ``(N, in_features)`` samples of the layer's inputs.
        keep_ratio: in ``[0, 1]``; 0 always keeps the given order, 1 moves the strips
            unless the given order's neighbours are at least as correlated as the chain's.

    Returns:
        Whether the strips moved.

    Examples:
        >>> import torch, gblr
        >>> from gblr.layers.input_order import order_strips_by_inputs
        >>> layer = gblr.GBLRLinear(40, 80, init_cost=0.2)  # the block-diagonal start
        >>> noise = torch.randn(300, 44)
        >>> smooth = sum(noise[:, k : k + 40] for k in range(5))
        >>> order_strips_by_inputs(layer, smooth)  # its own order is already the best
        False
        >>> before = layer.dense_weight().detach()
        >>> order_strips_by_inputs(layer, smooth[:, torch.randperm(40)])
        True
        >>> after = layer.dense_weight().detach()  # the same columns, elsewhere
        >>> torch.allclose(after.norm(dim=0).sort().values, before.norm(dim=0).sort().values)
        True
    """
    if not isinstance(layer, GBLRLinear):
        raise TypeError(f"layer must be a gblr.GBLRLinear, got {type(layer).__name__}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise TypeError(f"keep_ratio must be a number in [0, 1], got {keep_ratio!r}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    if isinstance(inputs, Tensor) and (inputs.dim() != 2 or inputs.shape[1] != layer.in_features):
        raise ValueError(
            f"inputs must be (samples, in_features={layer.in_features}), got shape "
            f"{tuple(inputs.shape)}"
        )
    in_features = layer.in_features
    widths, locations = layer.widths.detach(), layer.locations.detach()
    strips = (interval_lengths(widths[0], in_features) == 1) & (
        interval_lengths(widths[1], layer.out_features) > 0
    )
    if not bool(strips.any()):
        return False
    similarity = _correlations(inputs)
    order = _best_chain(similarity)
    own = _adjacent(similarity, torch.arange(in_features))
    if own >= keep_ratio * _adjacent(similarity, order):
        return False
    lines = interval_starts(locations[0], in_features)
    with torch.no_grad():
        moved = layer.V[strips].clone()
        moved[..., order] = layer.V[strips]
        layer.V[strips] = moved
        new_lines = order[lines[strips]].to(locations.dtype)
        layer.locations[0, strips] = new_lines / in_features
    return True
