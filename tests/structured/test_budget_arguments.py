"""Every family takes its budget the same way: ``budget`` a fraction in (0, 1] (the int 1
meaning 1.0, any other int refused), or ``budget_macs`` an absolute MAC count; exactly one.
A well-formed budget below the smallest layer is a ``BudgetTooSmallError`` naming the
minimum; a malformed one is a plain ``TypeError``/``ValueError``."""

import re

import pytest
import torch

from gblr.structured import FAMILIES, BudgetTooSmallError

# (out, in): uneven, so that every family pads or splits unevenly somewhere.
OUT, IN = 24, 40


def weight():
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))


def build(family, how, **budget):
    """A layer of ``family`` from ``weight()`` (``from_dense``) or fresh (``for_budget``,
    seeded so that two calls give the same layer)."""
    if how == "from_dense":
        return family.from_dense(weight(), **budget)
    torch.manual_seed(1)
    return family.for_budget(IN, OUT, **budget)


HOW = ["from_dense", "for_budget"]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.mark.parametrize("how", HOW)
def test_the_int_1_is_the_whole_budget(family, how):
    whole, one = build(family, how, budget=1.0), build(family, how, budget=1)
    assert one.flops() == whole.flops() > 1
    assert torch.equal(one.dense_weight(), whole.dense_weight())


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("count", [2, 300])
def test_another_int_budget_is_refused_naming_budget_macs(family, how, count):
    with pytest.raises(ValueError, match=rf"got the int {count}; .* pass budget_macs={count}") as e:
        build(family, how, budget=count)
    assert not isinstance(e.value, BudgetTooSmallError)  # convert must not skip on it


@pytest.mark.parametrize("how", HOW)
def test_budget_macs_is_never_exceeded(family, how):
    minimum = None
    for count in (1, 50, 97, 200, 333, 512, OUT * IN, 10 * OUT * IN):
        try:
            layer = build(family, how, budget_macs=count)
        except BudgetTooSmallError:
            assert minimum is None, f"{count} MACs too small after {minimum} fitted"
            continue
        minimum = minimum or count
        assert layer.flops() <= count
    assert minimum is not None and minimum <= 200  # the larger counts all built a layer


@pytest.mark.parametrize("how", HOW)
def test_budget_macs_and_the_same_fraction_agree(family, how):
    fraction = 0.3
    count = int(fraction * OUT * IN)  # 288: an exact fraction of the dense MACs
    by_count, by_fraction = (
        build(family, how, budget_macs=count),
        build(family, how, budget=fraction),
    )
    assert by_count.flops() == by_fraction.flops() <= count
    assert torch.equal(by_count.dense_weight(), by_fraction.dense_weight())


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    ("budget", "got"),
    [
        ({}, "budget=None and budget_macs=None"),
        ({"budget": 0.5, "budget_macs": 100}, "budget=0.5 and budget_macs=100"),
    ],
    ids=str,
)
def test_both_or_neither_is_refused(family, how, budget, got):
    with pytest.raises(
        ValueError, match=rf"give exactly one of budget .* and budget_macs .*, got {got}$"
    ) as e:
        build(family, how, **budget)
    assert not isinstance(e.value, BudgetTooSmallError)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ({"budget": True}, r"budget must be a number in \(0, 1\] .*got True \(bool\)"),
        ({"budget": "0.5"}, r"budget must be a number in \(0, 1\] .*got '0.5' \(str\)"),
        ({"budget_macs": True}, r"budget_macs must be an int >= 1 .*got True \(bool\)"),
        ({"budget_macs": "100"}, r"budget_macs must be an int >= 1 .*got '100' \(str\)"),
        ({"budget_macs": 100.0}, r"budget_macs must be an int >= 1 .*got 100.0 \(float\)"),
    ],
    ids=str,
)
def test_a_bool_or_str_budget_is_a_type_error(family, how, budget, match):
    with pytest.raises(TypeError, match=match):
        build(family, how, **budget)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ({"budget": 0.0}, r"budget must be a fraction in \(0, 1\] .*got 0.0"),
        ({"budget": 1.5}, r"budget must be a fraction in \(0, 1\] .*got 1.5"),
        ({"budget": float("nan")}, r"budget must be a fraction in \(0, 1\] .*got nan"),
        ({"budget_macs": 0}, r"budget_macs must be an int >= 1 \(a MAC count\), got 0"),
    ],
    ids=str,
)
def test_a_budget_out_of_range_is_a_plain_value_error(family, how, budget, match):
    with pytest.raises(ValueError, match=match) as e:
        build(family, how, **budget)
    assert not isinstance(e.value, BudgetTooSmallError)


@pytest.mark.parametrize("how", HOW)
def test_too_small_names_the_minimum_and_the_smallest_fraction_that_works(family, how):
    with pytest.raises(BudgetTooSmallError) as caught:
        build(family, how, budget=1e-4)  # floors to 0 MACs: below every family's minimum
    message = str(caught.value)
    found = re.search(
        r"^budget=0.0001 allows 0 of the 960 dense MACs, below the minimum of (\d+) MACs "
        r"\(the smallest .* layer of shape \(24, 40\)\): budget must be at least ([\d.]+) "
        r"\(or budget_macs at least \1\)$",
        message,
    )
    assert found, message
    minimum, smallest = int(found[1]), float(found[2])
    assert build(family, how, budget_macs=minimum).flops() <= minimum
    assert build(family, how, budget=smallest).flops() <= smallest * OUT * IN
    if minimum > 1:  # (a block-sparse layer's minimum is one 1 x 1 tile)
        with pytest.raises(BudgetTooSmallError, match=f"^budget_macs={minimum - 1}, below"):
            build(family, how, budget_macs=minimum - 1)
