"""The learner's budget counted per example: each layer's MACs times the rows it runs on."""

import copy

import pytest
import torch
from torch import nn

import gblr
from gblr.cost import layer_rows
from tests.learn.test_learner import train

TOKENS, CHANNELS = 8, 16


class TokenChannelMixer(nn.Module):
    """An MLP-Mixer block in miniature: ``token`` mixes the 8 tokens of each of the 16
    channels (16 rows per example), ``channel`` mixes the channels of each token (8 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = gblr.GBLRLinear(TOKENS, TOKENS)
        self.channel = gblr.GBLRLinear(CHANNELS, CHANNELS)
        self.dropout = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(TOKENS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, TOKENS, CHANNELS)
        x = self.norm(x)
        x = x + self.token(x.transpose(1, 2)).transpose(1, 2)
        return self.channel(self.dropout(x))


def _model() -> TokenChannelMixer:
    torch.manual_seed(0)
    return TokenChannelMixer()


def _train(model, learner, steps):
    torch.manual_seed(1)
    x, y = torch.randn(32, TOKENS, CHANNELS), torch.randn(32, TOKENS, CHANNELS)
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
    train(model, learner, optimizer, steps, x, y)


def _cost_by_hand(model: TokenChannelMixer, examples: int = 1) -> tuple[int, int]:
    """(MACs, dense MACs) of the two layers for ``examples`` examples, from the shapes."""
    token_rows, channel_rows = CHANNELS * examples, TOKENS * examples
    macs = model.token.flops() * token_rows + model.channel.flops() * channel_rows
    dense = TOKENS * TOKENS * token_rows + CHANNELS * CHANNELS * channel_rows
    return macs, dense


def test_layer_rows_counts_each_layers_rows_and_changes_nothing():
    model = _model()
    model.train()
    model.norm.eval()  # a mixed state, to see that each flag comes back
    statistics = model.norm.running_mean.clone()
    example = torch.randn(3, TOKENS, CHANNELS)
    generator_state = torch.get_rng_state()
    rows = layer_rows(model, [model.token, model.channel], example)
    assert rows == [3 * CHANNELS, 3 * TOKENS]
    assert model.training and model.token.training and not model.norm.training
    assert torch.equal(model.norm.running_mean, statistics)
    assert torch.equal(torch.get_rng_state(), generator_state)  # dropout drew nothing
    # a module listed twice is hooked once: its count is not doubled
    assert layer_rows(model, [model.token, model.token], example) == [3 * CHANNELS] * 2


def test_the_budget_is_met_per_example():
    model = _model()
    example = torch.randn(1, TOKENS, CHANNELS)
    learner = gblr.StructureLearner(
        model, budget=0.3, total_steps=40, warmup_steps=20, example_input=example
    )
    assert learner.row_weights == [2, 1] and learner.rows_unit == TOKENS
    _train(model, learner, 40)
    macs, dense = _cost_by_hand(model)
    assert learner.macs() == macs
    assert learner.summary()["dense_macs"] == dense
    assert 0.28 * dense <= macs <= 0.3 * dense
    # what count_flops says for one example, and for a batch of them (the same fraction)
    report = gblr.count_flops(model, example)
    assert report.macs == macs and report.dense_macs == dense
    assert gblr.count_flops(model, torch.randn(5, TOKENS, CHANNELS)).ratio == report.ratio
    # counted per row (no example) the same run would have looked cheaper than it is: the
    # token layer, run on twice the rows, kept the larger share of its MACs
    per_row_macs = model.token.flops() + model.channel.flops()
    per_row_dense = TOKENS * TOKENS + CHANNELS * CHANNELS
    assert per_row_macs / per_row_dense != pytest.approx(macs / dense)


def test_a_budget_in_macs_is_per_example():
    model = _model()
    example = torch.randn(1, TOKENS, CHANNELS)
    _, dense = _cost_by_hand(model)
    learner = gblr.StructureLearner(
        model, budget_macs=dense // 4 + 3, total_steps=20, example_input=example
    )
    _train(model, learner, 20)
    macs, _ = _cost_by_hand(model)
    assert dense // 4 - 2 * TOKENS * CHANNELS <= macs <= dense // 4 + 3
    assert learner.target_at(20) == (dense // 4 + 3) // TOKENS * TOKENS


def test_layers_on_the_same_rows_give_the_per_row_run_bit_for_bit():
    """With an example on which every layer sees the same rows, the costs are the per-row
    ones (the rows' common divisor is taken out): the run does not change."""
    torch.manual_seed(0)
    plain = nn.Sequential(gblr.GBLRLinear(16, 16), nn.ReLU(), gblr.GBLRLinear(16, 16))
    counted = copy.deepcopy(plain)
    per_row = gblr.StructureLearner(plain, budget=0.25, total_steps=30, warmup_steps=10)
    per_example = gblr.StructureLearner(
        counted, budget=0.25, total_steps=30, warmup_steps=10, example_input=torch.randn(7, 16)
    )
    assert per_example.row_weights == [1, 1] and per_example.rows_unit == 7
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    for model, learner in ((plain, per_row), (counted, per_example)):
        optimizer = torch.optim.Adam(gblr.param_groups(model, lr=3e-3))
        train(model, learner, optimizer, 30, x, y)
    for a, b in zip(plain.parameters(), counted.parameters(), strict=True):
        assert torch.equal(a, b)
    assert per_example.macs() == 7 * per_row.macs()


def test_a_layer_the_example_does_not_run_is_refused():
    model = _model()

    class SkipsTheChannelLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner.token(x)

    with pytest.raises(ValueError, match=r"example_input: the GBLR layers \['inner.channel'\]"):
        gblr.StructureLearner(
            SkipsTheChannelLayer(), budget=0.3, total_steps=5, example_input=torch.randn(2, 8)
        )


def test_a_state_counted_over_other_rows_is_refused():
    model = _model()
    example = torch.randn(1, TOKENS, CHANNELS)
    learner = gblr.StructureLearner(model, budget=0.3, total_steps=10, example_input=example)
    _train(model, learner, 3)
    state = learner.state_dict()
    assert state["row_weights"] == [2, 1]
    again = gblr.StructureLearner(model, budget=0.3, total_steps=10, example_input=example)
    again.load_state_dict(state)
    assert again.step_count == 3
    per_row = gblr.StructureLearner(model, budget=0.3, total_steps=10)
    with pytest.raises(ValueError, match=r"row_weights \[2, 1\], this learner's \[1, 1\]"):
        per_row.load_state_dict(state)


def test_an_example_of_keyword_arguments_runs_the_model_with_them():
    """As a Hugging Face model takes its tokenizer's output: ``model(**example_input)``."""

    class KeywordModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _model()

        def forward(self, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.inner(input_ids * scale)

    model = KeywordModel()
    example = {"input_ids": torch.randn(2, TOKENS, CHANNELS), "scale": 0.5}
    assert layer_rows(model, [model.inner.token, model.inner.channel], example) == [
        2 * CHANNELS,
        2 * TOKENS,
    ]
    learner = gblr.StructureLearner(model, budget=0.3, total_steps=5, example_input=example)
    assert learner.row_weights == [2, 1]


@pytest.mark.parametrize("budget", [None, 0.3])
def test_distill_counts_its_budget_per_example(budget):
    """``distill(example_input=...)``: the learner holds (or reaches) the MACs of one
    forward pass on the example, and ``DistillResult.macs`` counts them per example; the
    token layer runs on twice the channel layer's rows, so per row would differ."""
    from gblr.compress.distill import DistillConfig, distill

    teacher = _model()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a narrower student, so holding its MACs is a real constraint
        for layer in (student.token, student.channel):
            layer.widths[:, 1::2] = 0.25
    torch.manual_seed(2)
    batches = [torch.randn(8, TOKENS, CHANNELS) for _ in range(3)]
    start_macs, dense = _cost_by_hand(student)
    result = distill(
        student,
        teacher,
        batches,
        DistillConfig(steps=6, lr=1e-3, budget_ramp_fraction=0.5),
        budget=budget,
        example_input=batches[0][:1],
    )
    macs, _ = _cost_by_hand(student)
    assert result.macs == macs
    limit = start_macs if budget is None else budget * dense
    assert macs <= limit
    per_row = student.token.flops() + student.channel.flops()
    assert result.macs != per_row
