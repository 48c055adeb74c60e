import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn

import gblr
from gblr.layers.base import _skipped_gradients, skip_held_gradients
from gblr.learn.synthetic import planted_blocks, recovery_run


@pytest.mark.slow
def test_planted_structure_is_recovered(recovery_runs):
    """The method works: learned intervals find the planted blocks from random starts.

    With the learner's reliability options, their passes every 20 steps and the learning
    rate decayed over the last quarter (the benchmark's recommended setting): 5/5 seeds
    at 1.5x the planted cost, errors <= 0.002 (20/20 on seeds 0-19, measured 2026-12-01
    on an Intel Xeon). The paper's plain method is chaotic here: 4-5/5 on an AMD EPYC in
    earlier sessions, 3/5 on the Xeon (seeds 1 and 4 at 0.038 and 0.036).
    """
    config = gblr.LearnerConfig.planted()
    runs = recovery_runs(range(5), budget_factor=1.5, config=config, lr_decay=0.25)
    assert all(run["macs"] <= run["budget"] for run in runs)
    errors = [run["error"] for run in runs]
    assert sum(error <= 2e-2 for error in errors) >= 4, errors


@pytest.mark.slow
def test_adaptive_and_shift_options_recover_reliably_at_1_1x(recovery_runs):
    """The options of the reliability goal, at the tight budget (1.1x the planted cost).

    Seeds 5-9 are those where the paper's plain method recovered only 2 of 5 when this was
    written (errors 0.004 0.001 0.083 0.388 0.404); with adaptive=1, max_shift=1 all 5
    recovered (largest error 0.009). The test runs seed 5 and the three the plain method
    missed (two rounds of two processes, for CI's time); floor 3 of 4 for a margin of one
    seed, which the plain method (1 of 4) does not reach.
    """
    # exact_from=None and revive=True: as measured. With the default final phase (the
    # structure fixed for the last 5% of the steps) seeds 5 and 7 miss (errors 0.20 and
    # 0.07; 2026-12-04); with removed components kept off, seeds 5 and 7 miss (0.18 and
    # 0.09; 2026-12-05). cut_exponent=0 and fill_budget=False: as it was measured.
    config = gblr.LearnerConfig(
        adaptive=gblr.AdaptiveConfig(1.0),
        shift_limit=gblr.ShiftLimitConfig(cells=1.0),
        exact_from=None,
        revive=True,
        cut_exponent=0.0,
        fill_budget=False,
        sigma=(1.0, 100.0),  # σ annealed and nothing held: the default when measured
        hold_narrow_sides=0,
    )
    runs = recovery_runs((5, 7, 8, 9), budget_factor=1.1, config=config)
    assert all(run["macs"] <= run["budget"] for run in runs)
    errors = [run["error"] for run in runs]
    assert sum(error <= 2e-2 for error in errors) >= 3, errors


@pytest.mark.slow
def test_ramp_shift_option_recovers_the_seeds_the_others_miss_at_1_1x(recovery_runs):
    """With ``max_shift_ramp=4`` added, seeds 0 and 3 recover at 1.1x: they failed with
    adaptive=1, max_shift=1 alone (seed 0 collapsed during the ramp) when this was written
    (errors then 0.0073 and 0.0012 with the option); seed 1 is a control that recovers
    either way. Floor: 2 of 3, a margin of one seed."""
    config = gblr.LearnerConfig(
        adaptive=gblr.AdaptiveConfig(1.0),
        shift_limit=gblr.ShiftLimitConfig(cells=1.0, cells_during_ramp=4.0),
        cut_exponent=0.0,  # the uniform cut of the planted preset
        fill_budget=False,  # and its budget as an upper bound only, as measured
        sigma=(1.0, 100.0),  # σ annealed and nothing held: the default when measured
        hold_narrow_sides=0,
    )
    runs = recovery_runs((0, 1, 3), budget_factor=1.1, config=config)
    assert all(run["macs"] <= run["budget"] for run in runs)
    errors = [run["error"] for run in runs]
    assert sum(error <= 2e-2 for error in errors) >= 2, errors


def test_max_shift_ramp_limits_moves_during_the_warmup():
    model = two_layer_model()
    shift_limit = gblr.ShiftLimitConfig(cells=None, cells_during_ramp=4.0)
    # Nothing held: the random start's narrow sides must be free to move.
    config = gblr.LearnerConfig(sigma=None, shift_limit=shift_limit, hold_narrow_sides=0)
    learner = gblr.StructureLearner(model, config, budget=1.0, total_steps=20, warmup_steps=3)
    layer = model[0]
    cells = torch.tensor([[1 / 32], [1 / 48]])
    for step in range(6):
        before = layer.locations.detach().clone()
        with torch.no_grad():
            layer.locations.add_(10 * cells)  # an Adam spike of 10 cells
        learner.step()
        moved = (torch.remainder(layer.locations.detach() - before + 0.5, 1.0) - 0.5).abs()
        if step < 3:  # during the ramp: at most 4 cells
            assert (moved / cells).max() <= 4.0 + 1e-4 and (moved / cells).min() >= 4 - 1e-4
        else:  # after it, no limit (cells=None): the whole move
            assert (moved / cells).min() > 9.9


def one_layer(u_scale):
    """Two full-size components of a 16x16 GBLR matrix; factor scales set per component."""
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(16, 16, num_components=2, bias=False)
    with torch.no_grad():
        layer.U.mul_(torch.tensor(u_scale).view(2, 1, 1))
    return layer


def test_adaptive_thresholds_shrink_the_component_that_carries_little_weight():
    # Component 0 carries 100x the weight of component 1; a budget of one full component.
    uniform = one_layer([1.0, 0.01])
    gblr.StructureLearner(uniform, budget_macs=32, total_steps=5).step()
    lengths = torch.stack(uniform.interval_lengths())
    assert torch.equal(lengths[:, 0], lengths[:, 1])  # one threshold: both shrink alike
    weighted = one_layer([1.0, 0.01])
    config = gblr.LearnerConfig(adaptive=gblr.AdaptiveConfig(1.0))
    learner = gblr.StructureLearner(weighted, config, budget_macs=32, total_steps=5)
    learner.step()
    assert weighted.flops() <= 32  # still met exactly by one global threshold
    assert weighted.live_mask().tolist() == [True, False]
    assert weighted.flops() >= 30


def test_max_shift_limits_structure_moves_after_the_warmup_only():
    model = two_layer_model()
    config = gblr.LearnerConfig(
        sigma=None, shift_limit=gblr.ShiftLimitConfig(cells=2.0), hold_narrow_sides=0
    )
    learner = gblr.StructureLearner(model, config, budget=1.0, total_steps=20, warmup_steps=3)
    layer = model[0]  # 32 in (columns), 48 out (rows)
    cells = torch.tensor([[1 / 32], [1 / 48]])

    def jump_and_step():
        before = (layer.widths.detach().clone(), layer.locations.detach().clone())
        with torch.no_grad():  # an Adam spike: 10 cells at once
            layer.widths.sub_(10 * cells)
            layer.locations.add_(10 * cells)
        learner.step()
        width_move = (layer.widths.detach() - before[0]).abs()
        location_move = torch.remainder(layer.locations.detach() - before[1] + 0.5, 1.0) - 0.5
        return width_move / cells, location_move.abs() / cells

    for _ in range(3):  # warm-up: no limit
        widths, locations = jump_and_step()
        assert locations.max() > 9.9
    for _ in range(3):
        widths, locations = jump_and_step()
        assert widths.max() <= 2.0 + 1e-4 and locations.max() <= 2.0 + 1e-4
        assert locations.min() >= 2.0 - 1e-4  # moved, but only by the limit


def two_layer_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        gblr.GBLRLinear(32, 48, structure_init="random"),
        nn.ReLU(),
        gblr.GBLRLinear(48, 16, structure_init="random"),
    )


def regression_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=generator)
    teacher = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    with torch.no_grad():
        y = teacher(x)
    return x, y


def train(model, learner, optimizer, steps, x, y):
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()


def test_budget_is_met_exactly():
    model = two_layer_model()
    x, y = regression_data()
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
    learner = gblr.StructureLearner(model, budget=0.25, total_steps=60, warmup_steps=30)
    train(model, learner, optimizer, 60, x, y)
    report = gblr.count_flops(model)
    assert 0.23 <= report.ratio <= 0.25
    assert learner.summary()["macs_ratio"] == pytest.approx(report.ratio)


def _comebacks(config=None):
    """``(learner, comebacks, removed)`` of 60 steps at budget 0.25 (the default start costs
    3x it): how often a component with a zero width became live again after a learner
    step, and how many components were removed at some step."""
    model = two_layer_model()
    x, y = regression_data()
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
    learner = gblr.StructureLearner(model, config, budget=0.25, total_steps=60, warmup_steps=30)
    removed_before = [
        torch.zeros(layer.num_components, dtype=torch.bool) for layer in learner.layers
    ]
    comebacks = 0
    for _ in range(60):
        train(model, learner, optimizer, 1, x, y)
        for layer, before in zip(learner.layers, removed_before):
            removed = (layer.widths <= 0).any(0)
            comebacks += int((before & ~removed).sum())
            before |= removed
    return learner, comebacks, sum(int(before.sum()) for before in removed_before)


def test_a_component_the_cut_removed_stays_removed():
    # The uniform cut removes more components than the default's: more to watch.
    learner, comebacks, removed = _comebacks(gblr.LearnerConfig(cut_exponent=0.0))
    assert not any(layer.revive_empty for layer in learner.layers)
    assert comebacks == 0 and removed > 10


def test_revive_lets_removed_components_come_back_as_the_papers_method_did():
    learner, comebacks, _ = _comebacks(gblr.LearnerConfig(revive=True, cut_exponent=0.0))
    assert all(layer.revive_empty for layer in learner.layers)
    assert comebacks > 0


def test_budget_as_absolute_macs():
    model = two_layer_model()
    x, y = regression_data()
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
    learner = gblr.StructureLearner(model, budget_macs=500, total_steps=20)
    train(model, learner, optimizer, 20, x, y)
    assert 450 <= gblr.count_flops(model).macs <= 500


def test_warmup_ramps_the_target_down_monotonically():
    model = two_layer_model()
    learner = gblr.StructureLearner(model, budget=0.2, total_steps=100, warmup_steps=50)
    targets = [learner.target_at(step) for step in range(0, 101)]
    assert targets[0] == learner.start_cost
    assert all(a >= b for a, b in zip(targets, targets[1:]))
    assert targets[50] == targets[100] == learner.final_target
    linear = gblr.StructureLearner(
        model, gblr.LearnerConfig(ramp="linear"), budget=0.2, total_steps=100, warmup_steps=50
    )
    middle = (linear.start_cost + linear.final_target) / 2
    assert abs(linear.target_at(25) - middle) <= 1


def test_irrelevant_layer_gets_no_macs():
    torch.manual_seed(0)
    used = gblr.GBLRLinear(24, 24, structure_init="random")
    unused = gblr.GBLRLinear(24, 24, structure_init="random")
    model = nn.ModuleDict({"used": used, "unused": unused})
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 24, generator=generator)
    y = x @ torch.randn(24, 24, generator=generator) / 5
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
    # A random start moves its MACs through the Gaussian smoothing (σ annealed), with
    # nothing held; the default learner is made for the block-diagonal start.
    config = gblr.LearnerConfig.annealed()
    learner = gblr.StructureLearner(model, config, budget=0.3, total_steps=400, warmup_steps=200)
    for _ in range(400):
        loss = (used(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
    total = used.flops() + unused.flops()
    assert unused.flops() <= 0.05 * total, (used.flops(), unused.flops())


def final_macs_for_lambda(lam):
    model = two_layer_model(seed=1)
    x, y = regression_data(seed=1)
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
    # The paper's method, as measured: the default's final phase (the last 2 of these 40
    # steps) moves the costs by about the drift the comment below allows for.
    learner = gblr.StructureLearner(
        model, gblr.LearnerConfig.paper(), lam=lam, optimizer=optimizer, total_steps=40
    )
    train(model, learner, optimizer, 40, x, y)
    return learner.macs()


def test_lambda_mode_is_monotone():
    # Steps of λ large enough to beat the widths' own drift over 40 steps (from λ = 0 to 1
    # the cost moved by ±1% either way, depending on the factors' initialisation).
    macs = [final_macs_for_lambda(lam) for lam in (0.0, 4.0, 16.0, 64.0)]
    assert all(a >= b for a, b in zip(macs, macs[1:])), macs
    assert macs[0] > macs[-1]


def test_sigma_schedules_are_monotone_and_hit_their_end():
    model = two_layer_model()
    for schedule in ("linear", "geometric"):
        config = gblr.LearnerConfig(sigma=(1.0, 100.0), sigma_schedule=schedule, exact_from=None)
        learner = gblr.StructureLearner(
            model, config, budget=0.5, total_steps=50, sigma_start_step=10
        )
        values = [learner.sigma_at(step) for step in range(0, 60)]
        assert all(a <= b for a, b in zip(values, values[1:]))
        assert values[0] == values[10] == 1.0
        assert values[50] == pytest.approx(100.0) and values[59] == pytest.approx(100.0)
        assert float(model[0].sigma) == 1.0  # applied to the layers at once
    constant = gblr.StructureLearner(
        model, gblr.LearnerConfig(sigma=7.0, exact_from=None), budget=0.5, total_steps=5
    )
    assert {constant.sigma_at(s) for s in range(10)} == {7.0}
    untouched = gblr.StructureLearner(
        model, gblr.LearnerConfig.finetune(), budget=0.5, total_steps=5
    )
    assert untouched.sigma_at(3) is None and float(model[0].sigma) == 7.0


def test_locations_wrap_and_widths_stay_in_range():
    model = two_layer_model()
    with torch.no_grad():
        model[0].locations.add_(3.7)
        model[0].widths[0, 0] = 1.5
        model[0].widths[1, 0] = -0.5
    learner = gblr.StructureLearner(model, budget=1.0, total_steps=5)
    learner.step()
    assert model[0].locations.min() >= 0 and model[0].locations.max() < 1
    assert model[0].widths.min() >= 0 and model[0].widths.max() <= 1


@pytest.mark.parametrize(
    ("options", "resume_at"),
    [
        ({}, 8),
        ({"adaptive": 1.0, "max_shift": 0.5}, 8),
        ({"adaptive": 1.0, "max_shift": 0.5}, 13),
        ({"max_shift": 0.5, "max_shift_ramp": 1.0}, 6),  # resumed inside the ramp
    ],
)
def test_state_dict_resume_is_bit_identical(options, resume_at):
    x, y = regression_data()

    def setup():
        model = two_layer_model()
        optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
        learner = gblr.StructureLearner(
            model, target=0.3, total_steps=20, warmup_steps=10, **options
        )
        return model, optimizer, learner

    model, optimizer, learner = setup()
    train(model, learner, optimizer, resume_at, x, y)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict(), learner.state_dict()))
    train(model, learner, optimizer, 20 - resume_at, x, y)
    reference = model.state_dict()

    resumed_model, resumed_optimizer, resumed_learner = setup()
    resumed_model.load_state_dict(checkpoint[0])
    resumed_optimizer.load_state_dict(checkpoint[1])
    resumed_learner.load_state_dict(checkpoint[2])
    sigma = learner.sigma_at(resume_at)  # None: the default leaves σ alone (inf)
    assert float(resumed_model[0].sigma) == (math.inf if sigma is None else pytest.approx(sigma))
    train(resumed_model, resumed_learner, resumed_optimizer, 20 - resume_at, x, y)
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    resumed_state, state = resumed_learner.state_dict(), learner.state_dict()
    resumed_held, held = resumed_state.pop("held"), state.pop("held")
    assert resumed_state == state
    assert (resumed_held is None) == (held is None)
    for key in held or {}:  # the default holds narrow sides: tensors, compared one by one
        assert torch.equal(resumed_held[key], held[key]), key


def test_summary_has_the_logging_fields():
    model = two_layer_model()
    config = gblr.LearnerConfig(sigma=(1.0, 100.0))  # "sigma" is logged while σ anneals
    learner = gblr.StructureLearner(model, config, budget=0.4, total_steps=10)
    learner.step()
    assert "sigma" not in gblr.StructureLearner(model, budget=0.4, total_steps=10).summary()
    summary = learner.summary()
    for key in ("sigma", "macs_ratio", "macs", "threshold", "live_components", "target_macs"):
        assert key in summary
    assert summary["macs_ratio"] <= 0.4
    lam_summary = gblr.StructureLearner(model, lam=0.1, structure_lr=1e-2, total_steps=10).summary()
    assert lam_summary["lam"] == 0.1 and "target_macs" not in lam_summary


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0.0}, ValueError, "budget"),
        ({"budget": -0.5}, ValueError, "budget"),
        ({"budget": 1.5}, ValueError, "budget"),
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": True}, TypeError, "budget"),
        ({}, ValueError, "exactly one"),
        ({"budget": 0.3, "lam": 0.1}, ValueError, "exactly one"),
        ({"lam": -1.0, "structure_lr": 0.1}, ValueError, "lam"),
        ({"lam": 0.1}, ValueError, "structure learning rate"),
        ({"budget": 0.3, "total_steps": 0}, ValueError, "total_steps"),
        ({"budget": 0.3, "warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"budget": 0.3, "config": {"pass_every": 5}}, TypeError, "LearnerConfig.from_dict"),
        ({"budget": 0.3, "pass_every": 5}, TypeError, r"unexpected keyword argument\(s\) \['pass"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs.setdefault("total_steps", 10)
    with pytest.raises(error, match=match):
        gblr.StructureLearner(two_layer_model(), **kwargs)


def test_model_without_gblr_layers_is_refused():
    with pytest.raises(ValueError, match="no GBLR layer"):
        gblr.StructureLearner(nn.Linear(4, 4), budget=0.5, total_steps=10)


def test_planted_blocks_cost_matches_the_exact_gblr_representation():
    target, cost = planted_blocks(32, num_blocks=(2, 2), block_sides=(4, 4), seed=3)
    assert cost == 2 * (4 + 4)
    assert torch.linalg.matrix_rank(target) <= 2
    with pytest.raises(ValueError, match="block_sides"):
        planted_blocks(8, block_sides=(4, 9))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"size": 0}, ValueError, "size"),  # was an empty matrix (block_sides unchecked)
        ({"size": True}, TypeError, "size"),
        ({"seed": float("nan")}, TypeError, "seed"),  # was torch's generator error
        ({"block_sides": (6.0, 24)}, TypeError, "block_sides"),  # was torch.randint's error
        ({"num_blocks": 3}, TypeError, "num_blocks"),
    ],
)
def test_planted_blocks_names_a_bad_argument(kwargs, error, name):
    with pytest.raises(error, match=rf"^{name} must"):
        planted_blocks(**{"size": 16, "block_sides": (2, 4), **kwargs})


@pytest.mark.parametrize(
    "lr_decay, error", [(1.5, ValueError), (-0.1, ValueError), ("x", TypeError)]
)
def test_recovery_run_refuses_a_bad_lr_decay(lr_decay, error):
    with pytest.raises(error, match="lr_decay"):
        recovery_run(0, lr_decay=lr_decay)


def test_exact_from_ends_the_schedule_on_exact_masks():
    """σ follows its schedule up to ``exact_from * total_steps`` and is inf from there, so
    the last steps train the masks that evaluation uses (eval mode: exact boxcars)."""
    model = two_layer_model()
    config = gblr.LearnerConfig(sigma=(1.0, 100.0), exact_from=0.8)
    learner = gblr.StructureLearner(model, config, budget=0.5, total_steps=50, sigma_start_step=10)
    values = [learner.sigma_at(step) for step in range(60)]
    assert values[10] == 1.0 and values[39] < 100.0
    assert all(a < b for a, b in zip(values[10:40], values[11:40]))
    assert values[40:] == [math.inf] * 20
    assert values[39] == pytest.approx(100.0 ** (29 / 30))  # geometric over steps 10..40
    layer = model[0]
    assert layer.widths.requires_grad and not learner.exact_phase()
    # Built before the switch, as a training loop builds it: it holds the structure too.
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=1e-2))
    learner.step_count = 39
    learner.step()  # step 40: exact masks and a fixed structure
    assert learner.exact_phase()
    assert float(layer.sigma) == math.inf and learner.summary()["sigma"] == math.inf
    assert not layer.widths.requires_grad and not layer.locations.requires_grad
    assert layer.U.requires_grad
    # The optimizer now trains the factors only.
    widths, locations, factors = (
        t.detach().clone() for t in (layer.widths, layer.locations, layer.U)
    )
    model.train()
    model(torch.randn(4, 32)).pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(layer.widths, widths) and torch.equal(layer.locations, locations)
    assert not torch.equal(layer.U, factors)
    # A learner restored in the final phase fixes the structure of the model it is given.
    fresh = two_layer_model()
    restored = gblr.StructureLearner(fresh, config, budget=0.5, total_steps=50)
    assert fresh[0].widths.requires_grad
    restored.load_state_dict(learner.state_dict())
    assert not fresh[0].widths.requires_grad and float(fresh[0].sigma) == math.inf
    x = torch.randn(3, layer.in_features)
    training = layer(x)
    layer.eval()
    assert torch.allclose(training, layer(x), atol=1e-5)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.0, ValueError, r"exact_from must be in \(0, 1\] or None, got 0.0"),
        (1.5, ValueError, r"exact_from must be in \(0, 1\] or None, got 1.5"),
        (True, TypeError, r"exact_from must be a number in \(0, 1\] or None, got True"),
        ("0.9", TypeError, r"exact_from must be a number"),
    ],
)
def test_exact_from_refuses_bad_values(value, error, match):
    with pytest.raises(error, match=match):
        gblr.LearnerConfig(exact_from=value)


def test_exact_from_with_sigma_left_alone_and_the_presets():
    """With ``sigma=None`` the layers keep their σ until the final phase, then exact; the
    default has the final phase, the paper's method and fine-tuning do not."""
    model = two_layer_model()
    for layer in (model[0], model[2]):
        layer.sigma.fill_(5.0)
    config = gblr.LearnerConfig(sigma=None, exact_from=0.9)
    learner = gblr.StructureLearner(model, config, budget=0.5, total_steps=10)
    assert learner.sigma_at(8) is None and learner.sigma_at(9) == math.inf
    for _ in range(8):
        learner.step()
    assert float(model[0].sigma) == 5.0 and model[0].widths.requires_grad
    learner.step()
    assert float(model[0].sigma) == math.inf and not model[0].widths.requires_grad
    assert gblr.LearnerConfig().exact_from == 0.95
    assert gblr.LearnerConfig.paper().exact_from is None
    assert gblr.LearnerConfig.finetune().exact_from is None
    assert gblr.LearnerConfig.planted().exact_from is None
    config = gblr.LearnerConfig(exact_from=1)
    assert config.exact_from == 1.0 and isinstance(config.exact_from, float)
    assert gblr.LearnerConfig.from_dict(config.to_dict()) == config
    paper = gblr.LearnerConfig.paper()
    assert gblr.LearnerConfig.from_dict(paper.to_dict()) == paper


def _torch_cost(view, widths, dtype):
    """Exact MACs of widths counted in torch, independently of the learner's NumPy count."""
    lengths = torch.round(widths.clamp(0.0, 1.0).to(dtype) * view.dims.to(dtype))
    live = (lengths > 0).all(dim=0)
    return int((view.ranks * lengths.sum(dim=0) * live).sum().item())


def _halvings(view, widths, target, scale, dtype, low, high):
    """``high`` after 60 halvings of ``[low, high]`` (``high`` fits ``target``, ``low``
    does not), each midpoint costed on its own in torch."""
    for _ in range(60):
        middle = 0.5 * (low + high)
        if _torch_cost(view, view.shrink(widths, middle, scale), dtype) <= target:
            high = middle
        else:
            low = middle
    return high


def _sequential_bisection(view, widths, target, scale, dtype):
    """The budget threshold by one halving at a time, each costed on its own in torch."""
    if _torch_cost(view, widths, dtype) <= target:
        return 0.0
    per_unit = view.unit_cost if scale is None else view.unit_cost * scale
    # A held width (scale 0) is never cut, so it bounds nothing.
    reach = torch.where(per_unit > 0, widths / per_unit, 0.0)
    high = float(reach.max().item()) * (1 + 1e-9) + 1e-12
    return _halvings(view, widths, target, scale, dtype, 0.0, high)


def _hints(threshold, generator):
    """Hints for a bisection whose answer is ``threshold``: on it, near it on either side,
    far off, of the other sign, and 0."""
    wobble = float(torch.rand((), generator=generator, dtype=torch.float64)) - 0.5
    return [
        threshold,
        threshold * (1 + 1e-4 * wobble),
        threshold * (1 + 0.05 * wobble),
        threshold * (1 + 0.1),
        threshold * 3.0,
        threshold * 1e-3,
        -threshold,
        0.0,
    ]


def _random_structures(seed, trials, dtype, width_factor=1.0):
    """``(generator, view, widths, scale)`` of 1-3 random GBLR layers per trial,
    with components closed on one side as the cut leaves them and, on even trials, a
    random per-width scale."""
    from gblr.learn.learner import _StructureView

    generator = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        shapes = torch.randint(3, 70, (int(torch.randint(1, 4, (1,), generator=generator)), 2))
        torch.manual_seed(trial)
        layers = [
            gblr.GBLRLinear(int(n), int(m), structure_init="random", dtype=dtype)
            for n, m in shapes.tolist()
        ]
        view = _StructureView(layers)
        widths = (width_factor * view.widths()).clamp(0.0, 1.0)
        widths[trial % 2, trial % 3 :: 3] = 0.0
        scale = None if trial % 2 else torch.rand(widths.shape, generator=generator) + 0.1
        yield generator, view, widths, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_budget_threshold_is_the_sequential_bisection_bit_for_bit(dtype):
    from gblr.learn.learner import _budget_threshold

    # The closed components: the halvings count only the components live at threshold 0.
    for generator, view, widths, scale in _random_structures(0, 40, dtype):
        assert view.cost(widths) == _torch_cost(view, widths, dtype)
        target = int(torch.randint(0, view.cost(widths) + 1, (1,), generator=generator))
        expected = _sequential_bisection(view, widths, target, scale, dtype)
        threshold, returned_scale = _budget_threshold(view, widths, target, scale)
        assert threshold == expected  # the same float, not just close
        assert returned_scale is scale
        # A hint (the learner's last threshold) changes the work, never the result.
        for hint in _hints(expected, generator):
            assert _budget_threshold(view, widths, target, scale, hint=hint)[0] == expected
        shrunk = view.shrink(widths, threshold, scale)
        assert view.cost(shrunk) == _torch_cost(view, shrunk, dtype) <= target
        view.write(shrunk)  # the layers' own count of the written widths agrees
        assert view.cost(shrunk) == sum(layer.flops() for layer in view.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_budget_threshold_of_many_strips_is_the_sequential_bisection_bit_for_bit(dtype):
    """Hundreds of live components, as the default start's strips give a pixel MLP: the
    first rounds cost them all two halvings at a time, later rounds only those whose
    line counts still differ between the bracket's ends, more halvings at a time."""
    from gblr.learn.learner import _budget_threshold, _halvings_for, _StructureView

    assert _halvings_for(1000) == 2 and _halvings_for(3) == 6 and _halvings_for(0) == 6
    torch.manual_seed(0)
    layers = [
        gblr.GBLRLinear(n, m, structure_init="blockdiag", init_cost=0.2, dtype=dtype)
        for n, m in ((256, 192), (192, 256))
    ]
    view = _StructureView(layers)
    generator = torch.Generator().manual_seed(1)
    # Long sides of random reach; the one-line sides held (scale 0), as the learner does.
    widths = view.widths().clamp(0.0, 1.0)
    one_line = widths * view.dims <= 1.5
    widths = torch.where(
        one_line, widths, torch.rand(widths.shape, generator=generator, dtype=torch.float64)
    )
    scale = (~one_line).double()
    assert widths.shape[1] > 300
    for fraction in (0.9, 0.5, 0.1):
        target = int(fraction * view.cost(widths))
        expected = _sequential_bisection(view, widths, target, scale, dtype)
        assert _budget_threshold(view, widths, target, scale)[0] == expected
        for hint in _hints(expected, generator):
            assert _budget_threshold(view, widths, target, scale, hint=hint)[0] == expected


def _sequential_growth(view, widths, target, scale, dtype):
    """The most negative threshold (the largest growth of the live widths, by ``scale``)
    whose cost fits ``target``, by one halving at a time, each costed on its own in
    torch; components not live do not grow. ``(threshold, scale with them at 0)``."""
    live = (torch.round(widths.clamp(0, 1).to(dtype) * view.dims.to(dtype)) > 0).all(dim=0)
    scale = (torch.ones_like(widths) if scale is None else scale) * live
    per_unit = view.unit_cost * scale
    room = max(float(((1 - widths[:, i]) / per_unit[:, i]).max()) for i in live.nonzero())
    low = -room * (1 + 1e-9) - 1e-12
    if _torch_cost(view, view.shrink(widths, low, scale), dtype) <= target:
        return low, scale
    return _halvings(view, widths, target, scale, dtype, low, 0.0), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fill_grows_the_live_widths_to_the_budget_as_a_sequential_bisection(dtype):
    from gblr.learn.learner import _budget_threshold

    # The closed components must not grow.
    for generator, view, widths, scale in _random_structures(1, 30, dtype, 0.5):
        cost, full = view.cost(widths), view.cost(torch.ones_like(widths) * (widths > 0))
        target = int(torch.randint(cost + 1, full + full // 4 + 2, (1,), generator=generator))
        expected, expected_scale = _sequential_growth(view, widths, target, scale, dtype)
        threshold, grown_scale = _budget_threshold(view, widths, target, scale, fill=True)
        assert threshold == expected < 0  # the same float, not just close
        for hint in _hints(expected, generator):
            grown_with_hint = _budget_threshold(view, widths, target, scale, fill=True, hint=hint)
            assert grown_with_hint[0] == expected
        assert torch.equal(grown_scale, expected_scale)
        grown = view.shrink(widths, threshold, grown_scale)
        assert _torch_cost(view, grown, dtype) <= target
        closed = ~(torch.round(widths.to(dtype) * view.dims.to(dtype)) > 0).all(dim=0)
        assert torch.equal(grown[:, closed], widths[:, closed])
        assert (grown >= widths).all()
        # Without fill, or at the budget already, the widths are left as they are.
        assert _budget_threshold(view, widths, target, scale)[0] == 0.0
        assert _budget_threshold(view, widths, cost, scale, fill=True)[0] == 0.0


def _shrinking_run(fill_budget, steps=40, warmup_steps=10):
    """A 48 x 40 and a 40 x 48 layer whose loss pulls every width down, learned to 0.3 of
    their MACs: ``(learner, ratio after each step, live components after each step)``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(gblr.GBLRLinear(48, 40), gblr.GBLRLinear(40, 48))
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=2e-2))
    config = gblr.LearnerConfig(fill_budget=fill_budget)
    learner = gblr.StructureLearner(
        model, config, budget=0.3, total_steps=steps, warmup_steps=warmup_steps
    )
    ratios, live = [], []
    x = torch.randn(16, 48)
    for _ in range(steps):
        loss = model(x).pow(2).mean() + sum(layer.widths.sum() for layer in model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
        ratios.append(learner.summary()["macs_ratio"])
        live.append(sum(int(layer.live_mask().sum()) for layer in model))
    return learner, ratios, live


def test_fill_budget_keeps_the_model_at_its_budget_after_the_warm_up():
    learner, ratios, live = _shrinking_run(fill_budget=True)
    # Steps 11..37 (after the warm-up, before the final phase at 0.95 * 40 = 38): within
    # one line of the widest layer (at rank 1: 48 MACs) of the budget.
    line = 48 / learner.view.dense_macs
    after_warmup = ratios[10 : learner.exact_step - 1]
    assert all(0.3 - line < ratio <= 0.3 for ratio in after_warmup)
    assert all(b <= a for a, b in zip(live, live[1:]))  # nothing closed comes back
    # The final phase fixes the structure: no growth there.
    assert ratios[learner.exact_step - 1 :] == [ratios[learner.exact_step - 1]] * (
        len(ratios) - learner.exact_step + 1
    )
    _, without, _ = _shrinking_run(fill_budget=False)
    assert without[-1] < 0.3 - 5 * line  # the loss alone leaves the budget unspent


def _strips_and_full_components(cut_exponent):
    """One learner step at 95% of the start's MACs on a 64 x 64 layer of four full-width
    components and four strips (one column, all rows): ``(widths before, after)``."""
    widths = torch.tensor([[1.0] * 4 + [1 / 64] * 4, [1.0] * 8], dtype=torch.float64)
    layer = gblr.GBLRLinear(
        64, 64, num_components=8, widths=widths, locations=torch.zeros(2, 8), sigma=None
    ).double()
    start = layer.flops()
    config = gblr.LearnerConfig(sigma=None, cut_exponent=cut_exponent, hold_narrow_sides=0)
    learner = gblr.StructureLearner(
        layer, config, budget_macs=int(0.95 * start), total_steps=10, warmup_steps=0
    )
    learner.step()
    assert layer.flops() <= 0.95 * start
    return widths, layer.widths.detach().clone()


def test_the_cut_scales_each_width_by_its_power_and_spares_strips():
    """Each width loses ``t * (cost per unit width) * width ** p`` for one global ``t``
    (recomputed here from the widths before and after), so a one-column strip loses
    ``(1/64) ** 0.5`` of a full side's cut and keeps its column, where the paper's
    uniform cut (``p = 0``) closes every strip first."""
    before, after = _strips_and_full_components(0.5)
    cut = (before - after) / (64 * before.sqrt())  # r = 1, both sides 64 wide
    assert torch.allclose(cut, cut[0, 0].expand_as(cut), rtol=1e-9)
    assert cut[0, 0] > 0
    assert (after[0, 4:] * 64).round().min() >= 1  # every strip keeps its column
    before, uniform = _strips_and_full_components(0.0)
    assert (uniform[0, 4:] * 64).round().max() == 0  # every strip closed
    assert torch.allclose(before - uniform, (before - uniform)[1, 0].expand(2, 8))


def _held_run(hold, steps=30, resume_at=None, skip=True, order="auto"):
    """Two layers started from GBLR's block-diagonal strips at 0.3 of their MACs, a loss
    that pulls every width down and moves every location, learned to 0.2 with
    ``hold_narrow_sides=hold``: ``(model, learner, widths at the start, locations at the
    start, the ratio after each step)``; with ``resume_at`` the run is saved there and
    finished by a fresh model, optimizer and learner loaded from the save. ``order``: the
    layers' ``evaluation_order`` (``"factored"`` keeps them off the column-strip form)."""
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            *(
                gblr.GBLRLinear(
                    fan_in, fan_out, structure_init="blockdiag", init_cost=0.3, sigma=None,
                    evaluation_order=order,
                )
                for fan_in, fan_out in ((48, 40), (40, 48))
            )
        )  # fmt: skip
        optimizer = torch.optim.Adam(gblr.param_groups(model, lr=2e-2))
        config = gblr.LearnerConfig(sigma=None, hold_narrow_sides=hold)
        learner = gblr.StructureLearner(
            model, config, budget=0.2, total_steps=steps, warmup_steps=10
        )
        if not skip:  # the layers compute the held sides' gradients, which are discarded
            for layer in model:
                skip_held_gradients(layer, learner, None)
        return model, optimizer, learner

    def step(model, optimizer, learner):
        loss = model(x).pow(2).mean() + sum(
            layer.widths.sum() + (layer.locations * 0.3).sin().sum() for layer in model
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
        return learner.summary()["macs_ratio"]

    model, optimizer, learner = setup()
    widths = [layer.widths.detach().clone() for layer in model]
    locations = [layer.locations.detach().clone() for layer in model]
    ratios = []
    for index in range(steps):
        if index == resume_at:
            saved = copy.deepcopy(
                (model.state_dict(), optimizer.state_dict(), learner.state_dict())
            )
            model, optimizer, learner = setup()
            for part, state in zip((model, optimizer, learner), saved):
                part.load_state_dict(state)
        ratios.append(step(model, optimizer, learner))
    return model, learner, widths, locations, ratios


def test_held_narrow_sides_keep_their_width_and_place_while_the_rest_is_cut():
    model, learner, widths, locations, ratios = _held_run(hold=1)
    for layer, start_widths, start_locations in zip(model, widths, locations):
        lines = torch.round(start_widths * torch.tensor([[layer.cols], [layer.rows]]))
        held = (lines > 0) & (lines <= 1)
        assert held.any(0).all()  # every strip of the start holds its one-line side
        assert torch.equal(layer.widths.detach()[held], start_widths[held])
        assert torch.equal(layer.locations.detach(), start_locations)
        # the long sides were learned and cut from 0.3 to the budget
        assert (layer.widths.detach()[~held] < start_widths[~held]).any()
    # After the warm-up and before the final phase the fill keeps the budget (to a line).
    line = 48 / learner.view.dense_macs
    assert all(0.2 - line < ratio <= 0.2 + 1e-9 for ratio in ratios[10 : learner.exact_step - 1])
    # Without holding, the same loss closes the one-line sides: every strip dies.
    *_, free_ratios = _held_run(hold=0)
    assert free_ratios[-1] == 0.0


def test_held_sides_skip_their_gradients_while_the_learner_lives_with_the_same_run():
    skipped, learner, *_ = _held_run(hold=1, order="factored")
    computed, *_ = _held_run(hold=1, skip=False, order="factored")
    for name, tensor in skipped.state_dict().items():
        assert torch.equal(tensor, computed.state_dict()[name]), name
    # Each layer's strips hold one side and both locations: those gradients were skipped.
    flags = [_skipped_gradients(layer) for layer in skipped]
    assert all(flag is not None and flag[2] and flag[0] != flag[1] for flag in flags), flags
    del learner
    gc.collect()
    assert all(_skipped_gradients(layer) is None for layer in skipped)
    # Without holding nothing is skipped.
    free, _alive_learner, *_ = _held_run(hold=0, steps=2)  # kept alive: none registered
    assert all(_skipped_gradients(layer) is None for layer in free)


def test_held_narrow_sides_resume_bit_for_bit():
    reference, learner, *_ = _held_run(hold=1)
    resumed, resumed_learner, *_ = _held_run(hold=1, resume_at=17)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert torch.equal(resumed_learner.held_sides, learner.held_sides)


def test_passes_leave_the_held_sides_and_their_components_places_alone():
    """Merge, untangle and refine on the block-diagonal start: before, a merge zeroed a
    held strip (factors and widths) and the next step gave it its width back, a dead
    component costing MACs; a refine moved held ends that the next step put back. A
    loose merge tolerance and no refine floor make the passes act often (measured before
    the fix: held values moved on 9 of 60 steps)."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *(
            gblr.GBLRLinear(a, b, structure_init="blockdiag", init_cost=0.3, sigma=None)
            for a, b in ((48, 40), (40, 48))
        )
    )
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=2e-2))
    config = gblr.LearnerConfig(
        sigma=None,
        merge=gblr.MergeConfig(tolerance=0.5),
        untangle=gblr.UntangleConfig(tolerance=0.5),
        refine=gblr.RefineConfig(floor=0.0),
        pass_every=4,
    )
    learner = gblr.StructureLearner(model, config, budget=0.2, total_steps=60, warmup_steps=8)
    sides = learner.held_sides
    assert sides is not None and sides.any(0).all()  # every strip holds a side
    components = sides.any(0, keepdim=True).expand_as(sides)
    assert all(held is not None for held in learner.passes["merge"].held)
    for _ in range(60):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
        widths = torch.cat([layer.widths.detach().double() for layer in model], 1)
        locations = torch.cat([layer.locations.detach().double() for layer in model], 1)
        assert torch.equal(widths[sides], learner.held_widths[sides]), learner.step_count
        assert torch.equal(locations[components], learner.held_locations[components])
    # Every component holds a side, so nothing merges; refine still moves the far ends
    # of the long sides.
    assert learner.summary()["merges"] == 0 and learner.summary()["refines"] > 0


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.0, TypeError), (True, TypeError)]
)
def test_hold_narrow_sides_refuses_bad_values(value, error):
    with pytest.raises(error, match="hold_narrow_sides"):
        gblr.LearnerConfig(hold_narrow_sides=value)


@pytest.mark.parametrize("replace", ["freeze", "merge_and_unload"])
def test_a_learner_refuses_to_step_layers_that_were_replaced(replace):
    # it stepped the detached layers in silence
    model = nn.Sequential(gblr.GBLRLinear(32, 32, init_cost=0.3), nn.ReLU(), nn.Linear(32, 4))
    learner = gblr.StructureLearner(model, budget=0.3, total_steps=10)
    learner.step()
    gblr.freeze(copy.deepcopy(model).eval())  # a copy: the learner's layers stay in place
    learner.step()
    getattr(gblr, replace)(model.eval())
    with pytest.raises(RuntimeError, match=rf"gblr.{replace} replaced the GBLR layer '0' in"):
        learner.step()
    assert learner.step_count == 2


def test_a_state_saved_for_another_budget_or_mode_is_refused():
    """It loaded in silence: a run saved at 0.3 resumed towards 0.1 with the saved
    threshold and ramp, and a budget's state loaded into a penalty (lam) learner."""
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 32), nn.ReLU(), gblr.GBLRLinear(32, 8))
    saved = gblr.StructureLearner(model, budget=0.3, total_steps=100).state_dict()
    gblr.StructureLearner(model, budget=0.3, total_steps=100).load_state_dict(saved)  # same
    with pytest.raises(ValueError, match=r"saved for a budget of 384 MACs.*budget of 128"):
        gblr.StructureLearner(model, budget=0.1, total_steps=100).load_state_dict(saved)
    penalty = gblr.StructureLearner(model, lam=0.5, total_steps=100, structure_lr=1e-3)
    with pytest.raises(ValueError, match=r"this learner has a lam=0\.5"):
        penalty.load_state_dict(saved)


def test_a_state_saved_with_another_budget_ramp_is_refused():
    """A Lightning run resumed with another `warmup_steps` loaded in silence and went on
    from the saved step on the new ramp. A longer run (`total_steps`) still resumes."""
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 32), nn.ReLU(), gblr.GBLRLinear(32, 8))
    saved = gblr.StructureLearner(model, budget=0.3, total_steps=100, warmup_steps=40)
    saved.step()
    state = saved.state_dict()
    longer = gblr.StructureLearner(model, budget=0.3, total_steps=200, warmup_steps=40)
    longer.load_state_dict(state)
    assert longer.step_count == 1
    with pytest.raises(ValueError, match=r"saved with warmup_steps=40, .* has warmup_steps=20"):
        gblr.StructureLearner(model, budget=0.3, total_steps=100, warmup_steps=20).load_state_dict(
            state
        )
    older = {key: value for key, value in state.items() if key != "warmup_steps"}
    gblr.StructureLearner(model, budget=0.3, total_steps=100).load_state_dict(older)  # not known


@pytest.mark.parametrize("rate, error", [(float("inf"), ValueError), (True, TypeError)])
def test_the_penalty_mode_refuses_a_structure_lr_that_param_groups_refuses(rate, error):
    # inf made the threshold infinite: the first step cut every component of every layer
    model = nn.Sequential(gblr.GBLRLinear(32, 32))
    with pytest.raises(error, match="structure_lr"):
        gblr.StructureLearner(model, lam=1e-3, total_steps=10, structure_lr=rate)


def test_a_budget_ramp_longer_than_the_run_warns():
    # accepted in silence, the run ended at 1.65x the dense MACs against a budget of 0.3
    model = nn.Sequential(gblr.GBLRLinear(32, 32))
    with pytest.warns(UserWarning, match=r"warmup_steps=100 > total_steps=10"):
        gblr.StructureLearner(model, budget=0.3, total_steps=10, warmup_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gblr.StructureLearner(model, budget=0.3, total_steps=10, warmup_steps=10)


def test_a_second_run_learns_the_structure_a_first_run_s_final_phase_fixed():
    """The final phase left widths and locations without a gradient on the model: a
    second run (new param_groups, new learner) on the same objects never learned the
    structure, while the same model rebuilt from its state_dict did."""
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 32, init_cost=0.5))

    def run(budget, steps):
        optimizer = torch.optim.Adam(gblr.param_groups(model, lr=1e-2))
        learner = gblr.StructureLearner(model, budget=budget, total_steps=steps)
        for _ in range(steps):
            loss = model(torch.randn(8, 32)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            learner.step()
        return optimizer

    run(0.5, 20)
    assert not model[0].widths.requires_grad  # the final phase fixed it
    user_fixed = nn.Sequential(gblr.GBLRLinear(32, 32)).requires_grad_(False)
    assert gblr.param_groups(user_fixed, lr=1e-3) == []  # the user's own choice stays
    optimizer = run(0.4, 10)
    assert "structure" in [group["name"] for group in optimizer.param_groups]
    assert model[0].widths.grad is not None  # learned during the second run


def test_a_learner_refuses_layers_the_user_replaced_or_deleted():
    """It went on stepping and costing them: its summary said 0.3 of the MACs while the
    model cost 1.39, and a deleted layer kept a share of the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 48, init_cost=0.3), nn.ReLU(), gblr.GBLRLinear(48, 8))
    learner = gblr.StructureLearner(model, budget=0.3, total_steps=10)
    learner.step()  # its layers are the model's: fine
    model[0] = gblr.GBLRLinear(32, 48)
    from gblr.learn.learner import MEMBERSHIP_CHECK_EVERY

    with pytest.raises(RuntimeError, match=r"GBLR layer '0' is no longer in the model"):
        for _ in range(MEMBERSHIP_CHECK_EVERY):  # checked every so many steps
            learner.step()
    import weakref

    gone = nn.Sequential(gblr.GBLRLinear(32, 48, init_cost=0.3))
    orphan = gblr.StructureLearner(gone, budget=0.3, total_steps=10)
    reference = weakref.ref(gone)
    del gone
    assert reference() is None  # the learner does not keep the model alive
    orphan.step()  # and steps the layers it holds, with nothing to compare them to


def test_numpy_options_are_stored_as_python_numbers_and_a_bad_optimizer_is_named():
    import json

    import numpy as np

    config = gblr.LearnerConfig(pass_every=np.int64(3), hold_narrow_sides=np.int64(1))
    json.dumps(config.to_dict())  # np.int64 was kept and failed to serialize
    # numpy's float32 was refused for sigma (ValueError) and exact_from (TypeError)
    config = gblr.LearnerConfig(sigma=(np.float32(1.0), np.int64(50)), exact_from=np.float32(0.5))
    assert config.sigma == (1.0, 50.0) and config.exact_from == 0.5
    assert all(type(v) is float for v in (*config.sigma, config.exact_from))
    assert gblr.LearnerConfig(sigma=np.float32(2.0)).sigma == 2.0
    distill = gblr.DistillConfig(steps=np.int64(3), lr=np.float32(1e-3), seed=np.int64(1))
    # kept as numpy, compress_pretrained failed writing report.json after all its work
    assert json.loads(json.dumps(distill.to_dict()))["steps"] == 3
    assert gblr.DistillConfig.from_dict(distill.to_dict()) == distill
    model = nn.Sequential(gblr.GBLRLinear(16, 16))
    gblr.StructureLearner(model, lam=np.float32(0.5), total_steps=5, structure_lr=1e-3)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        # it failed at the first step reading the list's param_groups
        gblr.StructureLearner(model, lam=0.1, total_steps=5, optimizer=[1, 2])


def test_an_anneal_that_starts_after_the_run_warns():
    # accepted in silence: σ stayed at its start for the whole run
    model = nn.Sequential(gblr.GBLRLinear(16, 16))
    paper = gblr.LearnerConfig.paper()  # σ 1 -> 100
    with pytest.warns(UserWarning, match=r"sigma_start_step=50 >= total_steps=5"):
        gblr.StructureLearner(model, paper, budget=0.5, total_steps=5, sigma_start_step=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gblr.StructureLearner(model, budget=0.5, total_steps=5, sigma_start_step=50)  # no σ
