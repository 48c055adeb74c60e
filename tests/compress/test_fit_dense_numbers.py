"""``fit_dense``'s budget: a fraction, or an explicit MAC count; never below one component."""

from __future__ import annotations

import re

import pytest
import torch

import gblr


def test_an_empty_matrix_is_refused_by_name():
    """It used to blame rank_per_component ("must be in [1, min(out, in) = 0]")."""
    for shape in [(0, 16), (16, 0)]:
        expected = f"weight must have at least one row and one column, got shape {shape}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            gblr.fit_dense(torch.zeros(shape), 0.5)


def test_budget_macs_is_an_absolute_count_and_an_int_budget_is_refused():
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    layer = gblr.fit_dense(weight, budget_macs=70, steps=0)
    assert 0 < layer.flops() <= 70
    with pytest.raises(ValueError, match=r"got the int 70; .* pass budget_macs=70"):
        gblr.fit_dense(weight, 70, steps=0)
    with pytest.raises(ValueError, match="exactly one of budget"):
        gblr.fit_dense(weight, 0.3, budget_macs=70, steps=0)
    with pytest.raises(ValueError, match="exactly one of budget"):
        gblr.fit_dense(weight, steps=0)
    with pytest.raises(TypeError, match="budget_macs must be an int"):
        gblr.fit_dense(weight, budget_macs=70.0, steps=0)


def test_a_budget_below_one_component_names_the_minimum():
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    # rank 3: one component is one row and one column of 3 entries each, 6 MACs of 240.
    with pytest.raises(ValueError, match=r"minimum of 6 MACs .*at least 0\.025 .*at least 6"):
        gblr.fit_dense(weight, 0.02, rank_per_component=3, steps=0)
    layer = gblr.fit_dense(weight, 0.025, rank_per_component=3, steps=0)  # the minimum
    assert layer.flops() == 6 and layer.live_components() == 1
