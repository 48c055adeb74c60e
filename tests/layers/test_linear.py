import gc
import io
import math

import pytest
import torch
from torch import nn

import gblr
from gblr.layers.base import BLOCKS_FULL_SHARE
from tests.conftest import circular_boxcar

ORDERS = ["materialize", "factored"]


def random_layer(in_features=13, out_features=9, **kwargs):
    kwargs.setdefault("structure_init", "random")
    return gblr.GBLRLinear(in_features, out_features, dtype=torch.float64, **kwargs)


def brute_force_weight(layer):
    """Independent reference: a loop over components with integer intervals."""
    m, n = layer.out_features, layer.in_features
    col_len, row_len = layer.interval_lengths()
    col_start, row_start = layer.interval_starts()
    rows = circular_boxcar(row_start.tolist(), row_len.tolist(), m)
    cols = circular_boxcar(col_start.tolist(), col_len.tolist(), n)
    weight = torch.zeros(m, n, dtype=torch.float64)
    for k in range(layer.num_components):
        block = layer.U[k].detach().double().T @ layer.V[k].detach().double()
        weight += rows[k][:, None] * block * cols[k][None, :]
    return weight


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(13,), (4, 13), (2, 3, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_weight(order, training, shape, bias):
    layer = random_layer(rank_per_component=2, bias=bias, sigma=3.0, evaluation_order=order)
    layer.train(training)
    x = torch.randn(*shape, dtype=torch.float64)
    expected = x @ layer.dense_weight().T
    if bias:
        expected = expected + layer.bias
    out = layer(x)
    assert out.shape == (*shape[:-1], 9)
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_both_orders_agree_and_auto_picks_by_rows():
    layer = gblr.GBLRLinear(256, 256, structure_init="random").eval()
    x_small, x_large = torch.randn(2, 256), torch.randn(4096, 256)
    assert layer._choose_order(2) == "factored"
    assert layer._choose_order(4096) == "materialize"
    for x in (x_small, x_large):
        outs = []
        for order in ORDERS:
            layer.evaluation_order = order
            outs.append(layer(x))
        assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_eval_weight_equals_brute_force_loop():
    layer = random_layer(rank_per_component=3, num_components=5).eval()
    assert torch.allclose(layer.dense_weight(), brute_force_weight(layer), atol=1e-12)


def test_training_with_sigma_inf_matches_eval():
    layer = random_layer()
    train_weight = layer.train().dense_weight()
    eval_weight = layer.eval().dense_weight()
    assert torch.equal(train_weight, eval_weight)


def test_training_masks_are_blurred_at_small_sigma():
    layer = random_layer(sigma=1.0)
    assert not torch.allclose(layer.train().dense_weight(), layer.eval().dense_weight(), atol=1e-3)


def test_sigma_changes_in_place_take_effect():
    # The layer caches the float value of its sigma buffer; every way of changing the
    # buffer must still reach the masks.
    layer = random_layer(sigma=1.0).train()
    blurred = layer.dense_weight()
    layer.sigma.fill_(math.inf)
    assert torch.equal(layer.dense_weight(), layer.eval().dense_weight())
    layer.train()
    layer.load_state_dict({**layer.state_dict(), "sigma": torch.tensor(1.0)})
    assert torch.equal(layer.dense_weight(), blurred)
    layer.sigma = torch.tensor(math.inf)
    assert torch.equal(layer.dense_weight(), layer.eval().dense_weight())


def test_first_training_forward_under_inference_mode_does_not_poison_later_backward():
    layer = random_layer(in_features=29, out_features=31, sigma=3.25).train()
    with torch.inference_mode():
        layer(torch.randn(2, 29, dtype=torch.float64))
    layer(torch.randn(2, 29, dtype=torch.float64)).sum().backward()
    assert layer.widths.grad is not None


def test_gradients_reach_factors_widths_and_locations():
    layer = random_layer(sigma=2.0)
    layer(torch.randn(6, 13, dtype=torch.float64)).pow(2).sum().backward()
    for name in ["U", "V", "widths", "locations", "bias"]:
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_dead_component_contributes_and_costs_nothing():
    widths = torch.tensor([[0.5, 0.0, 1.0], [0.5, 1.0, 0.0]])
    locations = torch.zeros(2, 3)
    layer = gblr.GBLRLinear(8, 6, num_components=3, widths=widths, locations=locations, sigma=2.0)
    assert layer.live_components() == 1
    assert layer.flops() == 4 + 3  # only component 0: |C| = 4, |R| = 3
    x = torch.randn(5, 8)
    for training in (True, False):
        layer.train(training)
        reference = layer(x)
        with torch.no_grad():
            layer.U[1:].normal_()
            layer.V[1:].normal_()
        assert torch.equal(layer(x), reference)


def off_components_layer():
    """A float64 layer whose components 1 (row width 0), 3 (column width below 0) and 4
    (both 0) are off, with non-zero factors everywhere."""
    torch.manual_seed(0)
    layer = random_layer(num_components=6, sigma=2.0)
    with torch.no_grad():
        layer.widths[1, 1] = 0.0
        layer.widths[0, 3] = -0.2
        layer.widths[:, 4] = 0.0
    return layer


@pytest.mark.parametrize("order", ORDERS)
def test_components_that_are_off_get_no_gradient_and_are_not_computed(order):
    layer = off_components_layer()
    layer.evaluation_order = order
    x = torch.randn(5, 13, dtype=torch.float64)
    target = torch.randn(5, 9, dtype=torch.float64)
    (layer(x) - target).square().sum().backward()
    # Independent reference: every component masked by the public op, product by hand.
    params = {
        name: getattr(layer, name).detach().clone().requires_grad_()
        for name in ("U", "V", "widths", "locations", "bias")
    }
    u, v = gblr.ops.mask_factors(
        params["U"], params["V"], params["widths"], params["locations"], 2.0
    )
    weight = u.reshape(-1, 9).T @ v.reshape(-1, 13)
    (x @ weight.T + params["bias"] - target).square().sum().backward()
    off = torch.tensor([False, True, False, True, True, False])
    assert torch.allclose(layer(x), x @ weight.T + params["bias"], atol=1e-12)
    for name in ("U", "V", "bias"):
        assert torch.allclose(getattr(layer, name).grad, params[name].grad, atol=1e-12), name
    for name in ("widths", "locations"):
        ours, reference = getattr(layer, name).grad, params[name].grad
        assert torch.allclose(ours[:, ~off], reference[:, ~off], atol=1e-12), name
        assert torch.equal(ours[:, off], torch.zeros_like(ours[:, off])), name
    # Through the smoothing alone, a zero width does get a gradient: that is what is cut.
    assert params["widths"].grad[:, off].abs().sum() > 0
    u_computed, v_computed = layer.masked_factors()
    assert u_computed.shape == (3, 9) and v_computed.shape == (3, 13)
    layer.eval()
    assert layer.masked_factors()[0].shape == (6, 9)  # eval: all K (exact boxcars)


def test_revive_empty_keeps_the_smoothing_gradient_of_zero_widths():
    layer = off_components_layer()
    layer.revive_empty = True
    x = torch.randn(5, 13, dtype=torch.float64)
    layer(x).square().sum().backward()
    off = torch.tensor([False, True, False, True, True, False])
    assert layer.widths.grad[:, off].abs().sum() > 0
    assert layer.masked_factors()[0].shape == (6, 9)


def test_layer_with_every_component_off_is_its_bias():
    layer = off_components_layer()
    with torch.no_grad():
        layer.widths.zero_()
    x = torch.randn(4, 13, dtype=torch.float64)
    for order in ORDERS:
        layer.evaluation_order = order
        assert torch.equal(layer(x), layer.bias.expand(4, 9))


def test_recorded_factors_cover_every_component_even_those_off():
    """While recording, the CPU computes all K (as CUDA always does): the off components
    are gated by ``where`` instead of left out, with the same output and gradients."""
    x = torch.randn(3, 13, dtype=torch.float64)
    skipped = off_components_layer()
    skipped(x).sum().backward()
    layer = off_components_layer()
    layer.record_factors()
    output = layer(x)
    output.sum().backward()
    assert layer.factor_record["grad_u"].shape == layer.U.shape
    assert layer.factor_record["u"].shape == layer.U.shape
    assert torch.allclose(output, skipped(x), atol=1e-12)
    off = torch.tensor([False, True, False, True, True, False])
    for name in ("U", "V", "widths", "locations"):
        ours, reference = getattr(layer, name).grad, getattr(skipped, name).grad
        assert torch.allclose(ours, reference, atol=1e-12), name
    assert torch.equal(layer.widths.grad[:, off], torch.zeros(2, 3, dtype=torch.float64))
    assert layer.widths.grad[:, ~off].abs().sum() > 0


def test_flops_counts_live_intervals():
    widths = torch.tensor([[0.25, 1.0, 0.5], [0.5, 0.0, 1.0]])
    layer = gblr.GBLRLinear(
        8, 4, rank_per_component=2, num_components=3, widths=widths, locations=torch.zeros(2, 3)
    )
    # component 0: |C| = 2, |R| = 2; component 1 dead; component 2: |C| = 4, |R| = 4.
    assert layer.flops() == 2 * ((2 + 2) + (4 + 4))
    assert layer.dense_flops() == 32


def test_full_init_is_a_low_rank_matrix():
    layer = gblr.GBLRLinear(20, 12, rank_per_component=2, num_components=3)
    assert torch.linalg.matrix_rank(layer.eval().dense_weight()).item() == 6
    assert layer.flops() == 6 * (20 + 12)


@pytest.mark.parametrize(
    ("scheme", "cost"), [("full", None), ("half", 0.5), ("blocks", 0.9), ("blocks", 0.3)]
)
def test_narrowed_full_components_still_cover_every_line(scheme, cost):
    # The learner narrows an interval from its end. Full components that all started at
    # 0 left the last lines of every side uncovered together (the digits ViT lost the
    # value rows of qkv and fell to chance); spread starts keep every line covered when
    # each full component keeps its spacing's share of a side (and a line, for rounding).
    layer = gblr.GBLRLinear(64, 192, structure_init=scheme, init_cost=cost).eval()
    col_lengths, row_lengths = layer.interval_lengths()
    full = ((col_lengths == 64) & (row_lengths == 192)).nonzero().flatten()
    assert len(full) >= 4
    # The spread does not change the starting matrix: its intervals are still full.
    assert torch.equal(layer.dense_weight(), _with_starts_at_zero(layer).dense_weight())
    with torch.no_grad():
        layer.widths[0, full] = 1.0 / len(full) + 1.0 / 64
        layer.widths[1, full] = 1.0 / len(full) + 1.0 / 192
    starts, lengths = layer.interval_starts(), layer.interval_lengths()
    for side, size in ((0, 64), (1, 192)):
        covered = torch.zeros(size, dtype=torch.bool)
        for k in full.tolist():
            covered[(torch.arange(int(lengths[side][k])) + int(starts[side][k])) % size] = True
        assert covered.all(), (side, (~covered).nonzero().flatten().tolist())


def _with_starts_at_zero(layer: gblr.GBLRLinear) -> gblr.GBLRLinear:
    copy = gblr.GBLRLinear(
        layer.in_features, layer.out_features, num_components=layer.num_components
    ).eval()
    copy.load_state_dict(layer.state_dict())
    full = (copy.widths >= 1).all(0)
    with torch.no_grad():
        copy.locations[:, full] = 0.0
    return copy


def test_default_num_components_and_weight_scale():
    layer = gblr.GBLRLinear(300, 200)
    assert layer.num_components == 200
    reference = nn.Linear(300, 200).weight.std().item()
    assert 0.7 < layer.eval().dense_weight().std().item() / reference < 1.4


@pytest.mark.parametrize("cost", [0.1, 0.3, 0.6])
def test_half_init_meets_the_starting_cost(cost):
    m, n = 96, 128
    layer = gblr.GBLRLinear(n, m, structure_init="half", init_cost=cost)
    widths = layer.widths.detach()
    full = (widths == 1.0).all(dim=0)
    assert 0 < full.sum() < layer.num_components
    relaxed = (widths[0] * n + widths[1] * m).sum().item()
    assert relaxed == pytest.approx(cost * m * n, rel=1e-4)
    # rounding to the integer grid moves the real cost by at most one row/column each
    assert abs(layer.flops() - cost * m * n) <= layer.num_components * 2
    ratio = layer.eval().dense_weight().std() / nn.Linear(n, m).weight.std()
    assert 0.5 < ratio.item() < 2.0


def test_half_init_too_expensive_is_refused():
    with pytest.raises(ValueError, match="init_cost"):
        gblr.GBLRLinear(64, 64, num_components=2, structure_init="half", init_cost=0.9)


def test_random_init_is_seeded():
    torch.manual_seed(3)
    a = gblr.GBLRLinear(10, 10, structure_init="random")
    torch.manual_seed(3)
    b = gblr.GBLRLinear(10, 10, structure_init="random")
    assert torch.equal(a.widths, b.widths) and torch.equal(a.U, b.U)
    assert a.widths.min() >= 0 and a.widths.max() <= 1


def test_state_dict_round_trip():
    layer = random_layer(rank_per_component=2, sigma=7.0)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone = random_layer(rank_per_component=2)
    clone.load_state_dict(torch.load(buffer))
    assert float(clone.sigma) == 7.0
    x = torch.randn(3, 13, dtype=torch.float64)
    for training in (True, False):
        layer.train(training), clone.train(training)
        assert torch.equal(layer(x), clone(x))
    assert set(layer.state_dict()) == {"U", "V", "widths", "locations", "bias", "sigma"}


def test_from_intervals_wraps():
    u = torch.randn(1, 1, 6, dtype=torch.float64)
    v = torch.randn(1, 1, 5, dtype=torch.float64)
    layer = gblr.GBLRLinear.from_intervals(u, v, [(4, 3)], [(3, 4)]).eval()
    rows = torch.tensor([4, 5, 0])
    cols = torch.tensor([3, 4, 0, 1])
    expected = torch.zeros(6, 5, dtype=torch.float64)
    expected[rows[:, None], cols] = (u[0].T @ v[0])[rows[:, None], cols]
    assert torch.allclose(layer.dense_weight(), expected)
    assert layer.flops() == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0, "out_features": 4}, "in_features"),
        ({"in_features": 4, "out_features": -1}, "out_features"),
        ({"in_features": 4, "out_features": 4, "rank_per_component": 5}, "rank_per_component"),
        ({"in_features": 4, "out_features": 4, "rank_per_component": 0}, "rank_per_component"),
        ({"in_features": 4, "out_features": 4, "num_components": 0}, "num_components"),
        ({"in_features": 4, "out_features": 4, "structure_init": "nope"}, "structure_init"),
        ({"in_features": 4, "out_features": 4, "structure_init": "half"}, "init_cost"),
        (
            {"in_features": 4, "out_features": 4, "structure_init": "full", "init_cost": 0.5},
            "init_cost",
        ),
        ({"in_features": 4, "out_features": 4, "init_cost": 1.5}, "init_cost"),
        ({"in_features": 4, "out_features": 4, "sigma": 0.0}, "sigma"),
        ({"in_features": 4, "out_features": 4, "sigma": math.nan}, "sigma"),
        ({"in_features": 4, "out_features": 4, "evaluation_order": "x"}, "evaluation_order"),
        (
            {
                "in_features": 4,
                "out_features": 4,
                "num_components": 2,
                "widths": [[0.5, 1.5], [0.5, 0.5]],
                "locations": [[0, 0], [0, 0]],
            },
            "widths",
        ),
        (
            {
                "in_features": 4,
                "out_features": 4,
                "num_components": 2,
                "widths": [[0.5, math.nan], [0.5, 0.5]],
                "locations": [[0, 0], [0, 0]],
            },
            "widths",
        ),
        (
            {
                "in_features": 4,
                "out_features": 4,
                "num_components": 2,
                "widths": [[0.5, 0.5], [0.5, 0.5]],
                "locations": [[0, math.inf], [0, 0]],
            },
            "locations",
        ),
        (
            {
                "in_features": 4,
                "out_features": 4,
                "num_components": 2,
                "widths": [[0.5, 0.5, 0.5]],
                "locations": [[0, 0, 0]],
            },
            "widths",
        ),
        ({"in_features": 4, "out_features": 4, "widths": torch.ones(2, 4)}, "together"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gblr.GBLRLinear(**kwargs)


def test_non_int_features_is_type_error():
    with pytest.raises(TypeError, match="in_features"):
        gblr.GBLRLinear(4.0, 3)


def test_wrong_input_size_is_refused():
    layer = gblr.GBLRLinear(5, 3)
    with pytest.raises(ValueError, match="in_features=5"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="in_features=5"):
        layer(torch.tensor(1.0))


def test_bad_intervals_are_refused():
    u, v = torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    with pytest.raises(ValueError, match="row_intervals"):
        gblr.GBLRLinear.from_intervals(u, v, [(4, 1)], [(0, 1)])
    with pytest.raises(ValueError, match="col_intervals"):
        gblr.GBLRLinear.from_intervals(u, v, [(0, 1)], [(0, 5)])


@pytest.mark.parametrize("order", ORDERS)
def test_bf16_autocast_is_close_to_float32(order):
    layer = gblr.GBLRLinear(64, 32, structure_init="random", evaluation_order=order)
    x = torch.randn(8, 64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a few percent of the output scale.
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    layer = gblr.GBLRLinear(16, 8, structure_init="random", sigma=3.0)
    x = torch.randn(4, 16)
    expected = layer(x)
    assert torch.allclose(layer.cuda()(x.cuda()).cpu(), expected, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_training_step_matches_cpu_float64(order):
    # On CUDA the training forward uses the fused Triton masking kernels; the CPU the
    # torch composition. Values and all four gradients must agree.
    layer = random_layer(in_features=300, out_features=70, rank_per_component=2, sigma=4.0)
    layer.evaluation_order = order
    gpu_layer = random_layer(in_features=300, out_features=70, rank_per_component=2).cuda()
    gpu_layer.load_state_dict(layer.state_dict())
    gpu_layer.evaluation_order = order
    x = torch.randn(5, 300, dtype=torch.float64)
    for module, inputs in ((layer, x), (gpu_layer, x.cuda())):
        module.train()(inputs).square().sum().backward()
    for name in ("U", "V", "widths", "locations", "bias"):
        ours, reference = getattr(gpu_layer, name).grad.cpu(), getattr(layer, name).grad
        assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-9), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_exact_structure(dtype):
    n = 3001  # a grid finer than 16-bit floats can resolve near 1
    widths = torch.tensor([[2999 / n, 1500 / n], [0.5, 0.25]])
    locations = torch.tensor([[1234 / n, 2 / n], [0.0, 0.5]])
    layer = gblr.GBLRLinear(n, 8, num_components=2, widths=widths, locations=locations)
    before = (layer.interval_lengths(), layer.interval_starts(), layer.flops())
    layer = layer.to(dtype)
    assert layer.U.dtype == dtype and layer.bias.dtype == dtype
    assert layer.widths.dtype == torch.float32 and layer.locations.dtype == torch.float32
    after = (layer.interval_lengths(), layer.interval_starts(), layer.flops())
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
    assert before[2] == after[2]
    out = layer.eval()(torch.randn(2, n, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("structure_init", ["half", "blocks"])
@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (128, 128)])
def test_balanced_factors_keep_the_linear_weight_scale_and_equal_norms(structure_init, shape):
    torch.manual_seed(0)
    n, m = shape
    layer = gblr.GBLRLinear(n, m, structure_init=structure_init, init_cost=0.2).eval()
    reference = 1 / (3 * n) ** 0.5  # nn.Linear's weight std
    weight = layer.dense_weight()
    covered = weight != 0
    ratio = weight[covered].std().item() / reference
    assert 0.6 < ratio < 1.6, ratio
    # Balanced: each live component's masked factors have equal squared norms in
    # expectation, so summed over the components they agree closely.
    col_mask, row_mask = layer.masks()
    live = layer.live_mask()
    u = (layer.U.detach() * row_mask.unsqueeze(1))[live].pow(2).sum()
    v = (layer.V.detach() * col_mask.unsqueeze(1))[live].pow(2).sum()
    assert 0.7 < (u / v).item() < 1.4


def _factors_over_intervals(layer: gblr.GBLRLinear) -> dict[str, torch.Tensor]:
    """Rank-1 ``U`` ``(K, rows)`` and ``V`` ``(K, cols)``, zero outside each interval."""
    col_mask, row_mask = layer.eval().masks()
    return {
        "U": layer.U.detach().double()[:, 0] * row_mask.double(),
        "V": layer.V.detach().double()[:, 0] * col_mask.double(),
    }


@pytest.mark.parametrize("structure_init", ["blockdiag", "blocks", "full"])
def test_fixed_norm_factors_have_their_expected_norm_and_the_balanced_direction(structure_init):
    init_cost = None if structure_init == "full" else 0.2

    def layer(scheme: str, seed: int) -> gblr.GBLRLinear:
        torch.manual_seed(seed)
        return gblr.GBLRLinear(
            96, 160, structure_init=structure_init, init_cost=init_cost, factor_init=scheme
        )

    fixed = _factors_over_intervals(layer("fixed_norm", 0))
    col_lengths, row_lengths = layer("fixed_norm", 0).interval_lengths()
    # The expected squared norm of the balanced draw, estimated over 100 seeds (the
    # structure does not depend on the seed for these starts).
    draws = [_factors_over_intervals(layer("balanced", seed)) for seed in range(100)]
    for name, lengths in (("U", row_lengths), ("V", col_lengths)):
        live = lengths > 0
        # Same direction as the balanced draw of the same seed, by the cosine.
        cosine = torch.nn.functional.cosine_similarity(draws[0][name], fixed[name], dim=1)[live]
        assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6)
        # Exactly the expected norm, component by component.
        expected = torch.stack([draw[name].pow(2).sum(1) for draw in draws]).mean(0).sqrt()
        ratio = fixed[name].norm(dim=1)[live] / expected[live]
        # 100 draws of a one-line factor estimate its norm within about 7% (1 std).
        assert (ratio - 1).abs().max() < 0.3, (name, ratio.min(), ratio.max())
        assert abs(ratio.mean() - 1) < 0.05, (name, ratio.mean())


def test_fixed_norm_gives_every_input_line_of_the_block_diagonal_start_one_scale():
    torch.manual_seed(0)
    norms = {}
    for scheme in ("balanced", "fixed_norm"):
        layer = gblr.GBLRLinear(
            256, 512, structure_init="blockdiag", init_cost=0.1, factor_init=scheme
        ).eval()
        norms[scheme] = layer.dense_weight().norm(dim=0)  # one norm per input line
    spread = {scheme: (n.max() / n.min()).item() for scheme, n in norms.items()}
    # Blocks differ by at most one line in length: a few percent; a normal draw of the
    # strips' one-number factors spreads the lines' scales by orders of magnitude.
    assert spread["fixed_norm"] < 1.1 < 10 < spread["balanced"], spread


def test_uniform_factor_init_is_the_linear_bound_on_v():
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(100, 50, factor_init="uniform")
    assert layer.V.abs().max().item() <= 1 / 100**0.5
    reference = nn.Linear(100, 50).weight.std().item()
    assert 0.7 < layer.eval().dense_weight().std().item() / reference < 1.4
    with pytest.raises(ValueError, match="factor_init must be one of"):
        gblr.GBLRLinear(100, 50, factor_init="xavier")


@pytest.mark.parametrize("full_share", [0.0, 0.25, 0.5, 2 / 3, 0.75, 0.9])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (64, 64)])
def test_blocks_full_share_is_the_cost_on_full_components(full_share, shape):
    n, m = shape
    cost = 0.3
    layer = gblr.GBLRLinear(n, m, structure_init="full")
    layer.init_structure("blocks", cost, full_share=full_share)
    col_lengths, row_lengths = layer.interval_lengths()
    full = (col_lengths == n) & (row_lengths == m)
    # Whole full components at or under their share: short by less than one (r (m + n)).
    full_cost = layer.rank_per_component * (m + n)
    budget = cost * m * n
    assert full_share * budget - full_cost < full.sum().item() * full_cost <= full_share * budget
    # The strips spend the rest: the start costs the budget within one cell.
    assert budget - layer.rank_per_component < layer.flops() <= budget
    if full_share == 0.0:
        blockdiag = gblr.GBLRLinear(n, m, structure_init="blockdiag", init_cost=cost)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                layer.interval_lengths() + layer.interval_starts(),
                blockdiag.interval_lengths() + blockdiag.interval_starts(),
            )
        )


def test_blocks_default_full_share_is_the_constant():
    layer = gblr.GBLRLinear(64, 128, structure_init="blocks", init_cost=0.3)
    explicit = gblr.GBLRLinear(64, 128, structure_init="full")
    explicit.init_structure("blocks", 0.3, full_share=BLOCKS_FULL_SHARE)
    assert torch.equal(layer.widths, explicit.widths)
    assert torch.equal(layer.locations, explicit.locations)


@pytest.mark.parametrize(
    ("scheme", "full_share", "error", "match"),
    [
        ("blocks", 1.0, ValueError, r"full_share must be in \[0, 1\), got 1.0"),
        ("blocks", -0.1, ValueError, "full_share must be in"),
        ("blocks", float("nan"), ValueError, "full_share must be in"),
        ("blocks", "0.5", TypeError, "full_share must be a number"),
        ("blocks", True, TypeError, "full_share must be a number"),
        ("half", 0.5, ValueError, "only used with structure_init='blocks'"),
        ("blockdiag", 0.0, ValueError, "only used with structure_init='blocks'"),
    ],
)
def test_blocks_full_share_is_checked(scheme, full_share, error, match):
    layer = gblr.GBLRLinear(64, 64, structure_init="full")
    before = (layer.widths.clone(), layer.locations.clone())
    with pytest.raises(error, match=match):
        layer.init_structure(scheme, 0.3, full_share=full_share)
    assert torch.equal(layer.widths, before[0]) and torch.equal(layer.locations, before[1])


@pytest.mark.parametrize("scheme", ["blocks", "blockdiag"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (48, 200), (64, 64)])
@pytest.mark.parametrize("cost", [0.1, 0.3])
def test_blocks_init_is_a_block_diagonal_next_to_full_components(scheme, shape, cost):
    n, m = shape
    layer = gblr.GBLRLinear(n, m, structure_init=scheme, init_cost=cost).eval()
    col_lengths, row_lengths = layer.interval_lengths()
    full = (col_lengths == n) & (row_lengths == m)
    strips = layer.live_mask() & ~full
    # "blocks" puts BLOCKS_FULL_SHARE of the cost on full components, "blockdiag" none.
    assert (full.sum() >= 1) if scheme == "blocks" else (full.sum() == 0)
    assert strips.sum() >= 1
    # No strip wraps around the end of the long side (blocks run down the diagonal).
    starts = layer.interval_starts()
    assert ((starts[0] + col_lengths)[strips] <= n).all()
    assert ((starts[1] + row_lengths)[strips] <= m).all()
    # The start spends the budget: what is left cannot pay for one more cell (r MACs).
    assert cost * m * n - layer.rank_per_component < layer.flops() <= cost * m * n
    # Strips are one or two lines of the shorter side wide (as many strips as the
    # components left over from the full ones) and tile it without overlap.
    short_lengths = col_lengths if n <= m else row_lengths
    assert set(short_lengths[strips].tolist()) <= {1, 2}
    assert short_lengths[strips].sum() == min(n, m)
    coverage = torch.zeros(m, n)
    starts = layer.interval_starts()
    for k in torch.nonzero(strips).flatten().tolist():
        rows = (torch.arange(int(row_lengths[k])) + int(starts[1][k])) % m
        cols = (torch.arange(int(col_lengths[k])) + int(starts[0][k])) % n
        coverage[rows[:, None], cols] += 1
    assert coverage.max() == 1  # no entry covered twice by strips
    # Block-diagonal: the covered pattern equals the one of its own diagonal blocks.
    assert (coverage.sum(0) > 0).all() if n <= m else (coverage.sum(1) > 0).all()
    row_of_col = coverage.argmax(0) if n <= m else coverage.argmax(1)
    assert (row_of_col.diff() >= 0).all()  # blocks run down the diagonal, in order
    # The cost is the budget's within one line per strip of rounding.
    assert abs(layer.flops() - cost * m * n) <= strips.sum().item() + 2 * (m + n)


def _strip_layers(order="auto", rank=1, explicit=False):
    """Two layers of one-line strips held by a learner: 48 -> 40 (row strips) and
    40 -> 56 (column strips), or with ``explicit`` a 12 -> 9 layer of rank ``rank`` whose
    six components read columns 0, 3, 3, 5, 8, 11 (two share a column)."""
    torch.manual_seed(0)
    if explicit:
        columns = torch.tensor([0, 3, 3, 5, 8, 11], dtype=torch.float64) / 12
        widths = torch.stack([torch.full((6,), 1 / 12), torch.full((6,), 4 / 9)])
        locations = torch.stack([columns, torch.arange(6) / 9])
        layers = [
            gblr.GBLRLinear(
                12, 9, rank_per_component=rank, num_components=6, widths=widths,
                locations=locations, sigma=None, evaluation_order=order,
            )
        ]  # fmt: skip
    else:
        layers = [
            gblr.GBLRLinear(
                fan_in, fan_out, structure_init="blockdiag", init_cost=0.3, sigma=None,
                evaluation_order=order,
            )
            for fan_in, fan_out in ((48, 40), (40, 56))
        ]  # fmt: skip
    model = torch.nn.Sequential(*layers)
    learner = gblr.StructureLearner(
        model, gblr.LearnerConfig(sigma=None), budget=0.2, total_steps=10, warmup_steps=2
    )
    return model, learner


def _loss_and_gradients(model, x):
    out = model(x)
    (out.square().sum() + sum(layer.widths.sum() for layer in model)).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def _count_strip_forwards(monkeypatch):
    calls = []
    real = gblr.GBLRLinear._strips_forward

    def counted(self, *args):
        calls.append(self)
        return real(self, *args)

    monkeypatch.setattr(gblr.GBLRLinear, "_strips_forward", counted)
    return calls


@pytest.mark.parametrize(("rank", "explicit"), [(1, False), (1, True), (2, True)])
def test_strip_form_gives_the_masked_factors_product_and_its_gradients(rank, explicit, monkeypatch):
    """Held one-line sides are gathered or added into (`strips`): the output of the masked
    factors' two products exactly (to rounding where two components share a line), and the
    same gradients up to the order of a sum over rows; the dense weight's product too."""
    x = torch.randn(2, 3, 12 if explicit else 48)  # few rows: the strips pay
    model, learner = _strip_layers(rank=rank, explicit=explicit)
    reference, _reference_learner = _strip_layers("factored", rank=rank, explicit=explicit)
    sides = [layer.strips()[0] for layer in model]
    assert sides == ([0] if explicit else [1, 0])
    assert all(layer.strips() is None for layer in reference)
    calls = _count_strip_forwards(monkeypatch)
    out, grads = _loss_and_gradients(model, x)
    assert calls == list(model)
    expected, expected_grads = _loss_and_gradients(reference, x)
    if explicit:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5)
        assert grad.abs().sum() > 0 or "locations" in name or "widths" in name, name
    dense = x
    for layer in model:
        dense = dense @ layer.dense_weight().detach().t() + layer.bias.detach()
    torch.testing.assert_close(out.detach(), dense, rtol=1e-5, atol=1e-5)
    del learner


def test_strip_form_only_where_every_computed_component_is_one_held_line():
    model, learner = _strip_layers()
    assert all(layer.strips() is not None for layer in model)
    model.eval()
    assert all(layer.strips() is None for layer in model)  # eval: exact boxcars
    model.train()
    for sigma, strips in ((4.0, False), (math.inf, True)):  # smooth masks: not one entry
        for layer in model:
            layer.sigma.fill_(sigma)
        assert all((layer.strips() is not None) is strips for layer in model)
    with torch.no_grad():  # one component of each layer two lines wide on its held side
        for layer in model:
            side = layer.strips()[0]
            layer.widths[side, 0] = 2 / (layer.cols if side == 0 else layer.rows)
    assert all(layer.strips() is None for layer in model)
    del learner
    gc.collect()
    free = _strip_layers()[0]  # its learner is gone: nothing is held
    assert all(layer.strips() is None for layer in free)


def _count_window_forms(monkeypatch):
    """Record, for every call of the window form, whether it applied (not ``None``)."""
    calls = []
    real = gblr.layers.linear.strip_window_product

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(gblr.layers.linear, "strip_window_product", counted)
    return calls


@pytest.mark.parametrize("components_off", [False, True])
def test_narrow_strips_take_the_window_form_with_the_masked_factors_values(
    components_off, monkeypatch
):
    """Strips whose long side is narrow are computed over windows
    (`gblr.ops.strip_windows`): the masked factors' output and factor gradients, to
    rounding; with many rows, the masked factors' products as before."""

    def layers(order):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            gblr.GBLRLinear(64, 256, structure_init="blockdiag", init_cost=0.05,
                            sigma=None, evaluation_order=order),
            gblr.GBLRLinear(256, 64, structure_init="blockdiag", init_cost=0.05,
                            sigma=None, evaluation_order=order),
        )  # fmt: skip
        config = gblr.LearnerConfig(sigma=None)
        return model, gblr.StructureLearner(model, config, budget=0.05, total_steps=10)

    model, learner = layers("auto")
    reference, _reference_learner = layers("factored")
    assert [layer.strips()[0] for layer in model] == [0, 1]
    if components_off:  # read from all the factors, computed for the others only
        with torch.no_grad():
            for layer, twin, long_side in zip(model, reference, (1, 0), strict=True):
                layer.widths[long_side, [3, 40]] = twin.widths[long_side, [3, 40]] = 0.0
        assert all(layer._computed_index(False)[0].numel() == 62 for layer in model)
    calls = _count_window_forms(monkeypatch)
    x = torch.randn(3, 64)
    out, grads = _loss_and_gradients(model, x)
    assert calls == [True, True]
    expected, expected_grads = _loss_and_gradients(reference, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    _assert_factor_gradients_close(grads, expected_grads, rtol=1e-5, atol=1e-5)
    calls.clear()
    model(torch.randn(300, 64))  # 300 * 64 rank terms >= 64 * 256: not the strips' forms
    assert calls == []
    del learner


def _assert_factor_gradients_close(grads, expected, rtol, atol):
    """Every gradient but the widths' and locations' (which the window form reads from a
    cut edge kernel) as ``expected``'s, to the tolerances."""
    for name, grad in grads.items():
        if "widths" not in name and "locations" not in name:
            torch.testing.assert_close(grad, expected[name], rtol=rtol, atol=atol)


def test_many_rows_take_the_masked_factors_products_bit_for_bit(monkeypatch):
    """With at least ``in * out / (K r)`` input rows the strips' element-wise work over the
    rows would cost more than it saves: the forward is the masked factors' path exactly."""
    model, learner = _strip_layers()
    reference, _reference_learner = _strip_layers("factored")
    for layer in (*model, *reference):  # "auto" would pick by the rows; fix one order
        layer._choose_order = lambda vectors, rank_terms=None: "factored"
    x = torch.randn(64, 48)  # 64 * 40 >= 48 * 40 and 64 * 40 >= 40 * 56
    calls = _count_strip_forwards(monkeypatch)
    out, grads = _loss_and_gradients(model, x)
    assert calls == [] and all(layer.strips() is not None for layer in model)
    expected, expected_grads = _loss_and_gradients(reference, x)
    assert torch.equal(out, expected)
    assert all(torch.equal(grad, expected_grads[name]) for name, grad in grads.items())
    del learner


@pytest.mark.parametrize("rows", [256, 1024])
def test_large_layers_take_the_window_form_at_any_number_of_rows(rows, monkeypatch):
    """From `WINDOWED_LAYER_ENTRIES` weight entries on, held strips with short windows are
    computed over their windows even with many rows (the masked factors' output and factor
    gradients, to rounding), by the batched product below `RUNS_MIN_ROWS` rows and by
    in-place runs from it; a smaller layer at as many rows keeps the masked factors."""
    from gblr.layers.linear import WINDOWED_LAYER_ENTRIES
    from gblr.ops.strip_windows import RUNS_MIN_ROWS

    def layers(fan_in, fan_out, order):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            gblr.GBLRLinear(fan_in, fan_out, structure_init="blockdiag", init_cost=0.1,
                            sigma=None, evaluation_order=order)
        )  # fmt: skip
        config = gblr.LearnerConfig(sigma=None)
        return model, gblr.StructureLearner(model, config, budget=0.1, total_steps=10)

    calls = _count_window_forms(monkeypatch)
    assert WINDOWED_LAYER_ENTRIES == 512 * 512
    model, learner = layers(512, 512, "auto")
    reference, _reference_learner = layers(512, 512, "factored")
    assert (rows >= RUNS_MIN_ROWS) == (rows == 1024)  # one row count for each product
    x = torch.randn(rows, 512)
    out, grads = _loss_and_gradients(model, x)
    assert calls == [True]
    expected, expected_grads = _loss_and_gradients(reference, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    _assert_factor_gradients_close(grads, expected_grads, rtol=1e-4, atol=1e-3)
    calls.clear()
    small, small_learner = layers(256, 512, "auto")  # half the entries: not taken
    small(torch.randn(1024, 256))  # 1024 rows * 256 rank terms >= 256 * 512 entries
    assert calls == []
    del learner, small_learner


@pytest.mark.parametrize("make", ["linear", "conv"])
def test_a_starting_cost_alone_gives_the_block_diagonal_start(make):
    # init_cost without structure_init was refused until 2026-12-07; it now means the
    # start that trained best from scratch, and no init_cost still means "full".
    def build(**options):
        torch.manual_seed(0)
        if make == "linear":
            return gblr.GBLRLinear(96, 160, **options)
        return gblr.GBLRConv2d(8, 24, 3, padding=1, **options)

    implied, explicit = build(init_cost=0.2), build(structure_init="blockdiag", init_cost=0.2)
    assert torch.equal(implied.widths, explicit.widths)
    assert torch.equal(implied.locations, explicit.locations)
    assert implied.flops() <= 0.2 * implied.dense_flops()
    # one-line strips on the short side: the block-diagonal special case
    short_side = 0 if implied.cols <= implied.rows else 1
    short = min(implied.rows, implied.cols)
    assert int((implied.widths[short_side] * short).round().max()) == 1
    default, full = build(), build(structure_init="full")
    assert bool((default.widths == 1).all())
    assert torch.equal(default.locations, full.locations)


@pytest.mark.parametrize("make", ["linear", "conv"])
def test_the_block_diagonal_start_defaults_to_factors_at_their_expected_norm(make):
    # measured better than balanced factors on that start (BENCHMARKS, "Balanced factors
    # on the block-diagonal start"); the other starts keep "balanced"
    def build(**options):
        torch.manual_seed(0)
        if make == "linear":
            return gblr.GBLRLinear(96, 160, **options)
        return gblr.GBLRConv2d(8, 24, 3, padding=1, **options)

    for start, expected in (({"init_cost": 0.2}, "fixed_norm"), ({}, "balanced")):
        default, explicit = build(**start), build(**start, factor_init=expected)
        other = build(**start, factor_init="balanced" if expected == "fixed_norm" else "fixed_norm")
        assert torch.equal(default.U, explicit.U) and torch.equal(default.V, explicit.V)
        assert not torch.equal(default.U, other.U)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, rows", [((64, 128), 8), ((512, 512), 64)])
def test_held_strips_train_under_cpu_autocast(dtype, shape, rows):
    # the strips' training forms summed autocast's half-precision products into float32
    # buffers, and index_add_ refused them
    torch.manual_seed(0)
    inner, outer = shape
    model = nn.Sequential(nn.Linear(inner, outer), nn.ReLU(), nn.Linear(outer, inner))
    gblr.convert(model, gblr.GBLRConfig(budget=0.3, init="random"))
    gblr.StructureLearner(model, budget=0.3, total_steps=10)  # holds the strips
    x = torch.randn(rows, inner)
    expected = model(x).detach()
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    y.float().sum().backward()
    assert torch.allclose(y.float(), expected, rtol=0.05, atol=0.05)
    # as nn.Linear's under autocast, whichever form ran (a float32 bias promoted them)
    with torch.autocast("cpu", dtype=dtype):
        assert model[0](x).dtype == dtype and model[2](model[0](x)).dtype == dtype
    first = model[0]
    assert first.U.grad is not None and first.V.grad is not None
    assert bool(first.U.grad.isfinite().all()) and bool(first.V.grad.isfinite().all())


@pytest.mark.parametrize("shape", [(64, 48), (600, 520)])
def test_an_empty_batch_passes_the_held_strips_forms(shape):
    # the strips' window form reshaped 0 rows into (0, -1) and failed
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(*shape, init_cost=0.2))
    gblr.StructureLearner(model, budget=0.2, total_steps=10)  # holds the strips
    for batch in ((0, shape[0]), (2, 0, shape[0])):
        x = torch.randn(*batch, requires_grad=True)
        out = model(x)
        assert out.shape == (*batch[:-1], shape[1])
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape, cost", [((16, 16), 0.05), ((97, 89), 0.01), ((16, 16), 0.1)])
def test_a_start_too_small_for_a_strip_per_line_is_live_and_within_its_cost(shape, cost):
    """Below about 2 / max(in, out) of the MACs the block-diagonal start fell back to
    narrow components that rounded to empty intervals: a layer of zeros (0 MACs, no live
    component) that no gradient revives. Now as many one-cell-or-longer strips as the
    cost pays, all live, at most the cost asked (16x16 at 0.1 started at 0.125)."""
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(*shape, init_cost=cost)
    asked = cost * shape[0] * shape[1]
    assert 0.9 * asked <= layer.flops() <= asked
    live = layer.live_components()
    assert live >= 6 and int((layer.dense_weight() != 0).sum()) >= live


def test_an_init_cost_that_pays_for_no_component_is_refused_with_the_smallest():
    with pytest.raises(ValueError, match=r"init_cost=0\.005 .* use init_cost >= 0\.0078"):
        gblr.GBLRLinear(16, 16, init_cost=0.005)
    with pytest.raises(ValueError, match=r"too small to cost less than dense"):
        gblr.GBLRLinear(1, 1, init_cost=1.0)


def test_the_training_forward_uses_the_sigma_the_buffer_holds():
    """σ was cached by the buffer's id and version: a change through ``.data`` (not
    counted by torch) and a fresh σ tensor at a freed one's address (``functional_call``
    per call) were silently ignored."""
    from torch.func import functional_call

    torch.manual_seed(0)
    x = torch.randn(3, 12)
    layer = gblr.GBLRLinear(12, 8, structure_init="random", sigma=5.0)

    def at(sigma):  # the same layer's output at ``sigma``, built afresh
        other = gblr.GBLRLinear(12, 8, structure_init="random")
        other.load_state_dict({**layer.state_dict(), "sigma": torch.tensor(sigma)})
        return other(x)

    before = layer(x)
    layer.sigma.data.fill_(1.0)
    assert torch.allclose(layer(x), at(1.0)) and not torch.allclose(layer(x), before)
    for step in range(12):
        sigma = float(1 + step % 4)
        y = functional_call(layer, {"sigma": torch.tensor(sigma)}, (x,))
        assert torch.allclose(y, at(sigma), atol=1e-6), step


def test_torch_func_grad_of_an_eval_layer_matches_autograd():
    """The finite-structure check read data_ptr(), which torch.func's wrapped tensors do
    not have ("Cannot access data pointer of Tensor that doesn't have storage")."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    layer = gblr.GBLRLinear(16, 8, init_cost=0.3).eval()
    x = torch.randn(4, 16)
    params = {name: value.detach() for name, value in layer.named_parameters()}
    grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for name, value in layer.named_parameters():
        expected = torch.zeros_like(value) if value.grad is None else value.grad
        assert torch.allclose(grads[name], expected, atol=1e-5), name
