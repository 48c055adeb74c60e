"""Input orders read from data for the block-diagonal start, against brute force and the
layer's own weight."""

from __future__ import annotations

import itertools

import pytest
import torch

import gblr
from gblr.layers.input_order import (
    adjacent_correlation,
    correlation_chain,
    order_strips_by_inputs,
)


def _smooth(samples: int, features: int, seed: int = 0) -> torch.Tensor:
    """``(samples, features)`` white noise summed over 5 neighbouring features: features
    up to 4 apart correlated (a neighbour by 0.8), none further apart."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, features + 4, generator=generator)
    return sum(noise[:, shift : shift + features] for shift in range(5))


def _brute_force_best_chain(inputs: torch.Tensor) -> list[int]:
    """The greedy chain from every start, the best by its neighbours' summed correlations,
    by plain loops."""
    corr = torch.corrcoef(inputs.double().T).tolist()
    size = len(corr)
    best, best_score = None, float("-inf")
    for start in range(size):
        chain, score = [start], 0.0
        while len(chain) < size:
            last = chain[-1]
            following = max((j for j in range(size) if j not in chain), key=lambda j: corr[last][j])
            score += corr[last][following]
            chain.append(following)
        if score > best_score:
            best, best_score = chain, score
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_chain_is_the_best_greedy_chain_and_ignores_the_given_order(seed):
    inputs = torch.randn(50, 9, generator=torch.Generator().manual_seed(seed))
    inputs = inputs @ torch.randn(9, 9, generator=torch.Generator().manual_seed(seed + 10))
    assert correlation_chain(inputs).tolist() == _brute_force_best_chain(inputs)
    shuffle = torch.randperm(9, generator=torch.Generator().manual_seed(seed + 20))
    assert torch.equal(shuffle[correlation_chain(inputs[:, shuffle])], correlation_chain(inputs))


def test_the_chain_recovers_neighbours_of_shuffled_features():
    inputs = _smooth(400, 64)
    shuffle = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    order = correlation_chain(inputs[:, shuffle])
    lines = shuffle[order]
    assert float((lines[1:] - lines[:-1]).abs().float().mean()) < 1.5  # shuffled: about 21
    # as correlated as the features' hidden order, far more than the shuffled one
    chained = adjacent_correlation(inputs[:, shuffle], order)
    assert chained == pytest.approx(adjacent_correlation(inputs), abs=0.02)
    assert adjacent_correlation(inputs[:, shuffle]) < 0.3 < chained


def test_adjacent_correlation_against_a_loop():
    inputs = _smooth(100, 12) + torch.randn(100, 12)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    corr = torch.corrcoef(inputs.double().T)
    expected = sum(float(corr[a, b]) for a, b in itertools.pairwise(order.tolist())) / 11
    assert adjacent_correlation(inputs, order) == pytest.approx(expected, rel=1e-9)
    assert adjacent_correlation(inputs) == pytest.approx(
        sum(float(corr[j, j + 1]) for j in range(11)) / 11, rel=1e-9
    )


def test_strips_move_with_their_entries_and_the_weight_keeps_its_columns():
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(48, 96, init_cost=0.2)  # the block-diagonal start
    before = layer.dense_weight().detach().clone()
    inputs = _smooth(300, 48)
    shuffle = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    shuffled = inputs[:, shuffle]
    order = correlation_chain(shuffled)
    assert order_strips_by_inputs(layer, shuffled)
    after = layer.dense_weight().detach()
    torch.testing.assert_close(after[:, order], before, rtol=0, atol=0)
    # each block now mixes inputs that are neighbours in the hidden order
    x = shuffled[:5]
    torch.testing.assert_close(layer(x), x[:, order] @ before.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_an_order_that_already_groups_correlated_inputs_is_kept():
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(48, 96, init_cost=0.2)
    state = {name: value.clone() for name, value in layer.state_dict().items()}
    assert not order_strips_by_inputs(layer, _smooth(300, 48))
    assert all(torch.equal(value, state[name]) for name, value in layer.state_dict().items())
    # keep_ratio 0 keeps any order
    shuffled = _smooth(300, 48)[:, torch.randperm(48, generator=torch.Generator().manual_seed(2))]
    assert not order_strips_by_inputs(layer, shuffled, keep_ratio=0.0)
    assert order_strips_by_inputs(layer, shuffled)


def test_a_layer_without_one_line_input_strips_is_left_alone():
    torch.manual_seed(0)
    full = gblr.GBLRLinear(16, 16)  # full-width components
    state = {name: value.clone() for name, value in full.state_dict().items()}
    shuffled = _smooth(100, 16)[:, torch.randperm(16)]
    assert not order_strips_by_inputs(full, shuffled)
    assert all(torch.equal(value, state[name]) for name, value in full.state_dict().items())


@pytest.mark.parametrize(
    "inputs, keep_ratio, error, match",
    [
        ([[0.0] * 16] * 4, 0.5, TypeError, "inputs must be a torch.Tensor"),
        (torch.randn(10, 8), 0.5, ValueError, "in_features=16"),
        (torch.randn(1, 16), 0.5, ValueError, "at least 2"),
        (torch.full((4, 16), float("nan")), 0.5, ValueError, "finite"),
        (torch.randn(10, 16), 1.5, ValueError, "keep_ratio must be in"),
        (torch.randn(10, 16), "0.5", TypeError, "keep_ratio must be a number"),
    ],
)
def test_bad_input_is_refused_by_name(inputs, keep_ratio, error, match):
    layer = gblr.GBLRLinear(16, 32, init_cost=0.3)
    with pytest.raises(error, match=match):
        order_strips_by_inputs(layer, inputs, keep_ratio=keep_ratio)
    with pytest.raises(TypeError, match=r"gblr\.GBLRLinear"):
        order_strips_by_inputs(torch.nn.Linear(16, 32), torch.randn(10, 16))
