import pytest
import torch
from torch import nn

import gblr


def model():
    return nn.Sequential(
        gblr.GBLRLinear(8, 6), nn.LayerNorm(6), nn.Linear(6, 4), gblr.GBLRConv2d(2, 3, 3)
    )


def test_groups_split_weights_biases_and_structure():
    net = model()
    groups = {g["name"]: g for g in gblr.param_groups(net, lr=1e-3, weight_decay=0.05)}
    assert set(groups) == {"decay", "no_decay", "structure"}
    structure = groups["structure"]
    expected = {id(p) for m in (net[0], net[3]) for p in (m.widths, m.locations)}
    assert {id(p) for p in structure["params"]} == expected
    assert structure["weight_decay"] == 0.0 and structure["betas"] == (0.0, 0.999)
    assert structure["lr"] == 1e-3
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert groups["decay"]["weight_decay"] == 0.05
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in net.parameters()])


def test_structure_lr_and_optimizers_accept_the_groups():
    net = model()
    groups = gblr.param_groups(net, lr=1e-3, structure_lr=5e-2)
    assert [g["lr"] for g in groups if g["name"] == "structure"] == [5e-2]
    for optimizer_class in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        optimizer = optimizer_class(gblr.param_groups(net, lr=1e-3))
        net[0](torch.randn(2, 8)).sum().backward()
        optimizer.step()


def test_a_structure_lr_of_zero_trains_the_factors_and_keeps_the_structure():
    torch.manual_seed(0)
    net = model()
    start = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(gblr.param_groups(net, lr=1e-2, structure_lr=0.0))
    for _ in range(3):
        optimizer.zero_grad()
        (net[0](torch.randn(5, 8)).pow(2).sum() + net[3](torch.randn(2, 2, 5, 5)).sum()).backward()
        optimizer.step()
    for name, p in net.named_parameters():
        if not name.startswith(("0.", "3.")):  # the GBLR layers, which ran
            continue
        moved = not torch.equal(p.detach(), start[name])
        is_structure = name.endswith(("widths", "locations"))
        assert moved != is_structure, name


def test_frozen_and_shared_parameters():
    layer = nn.Linear(4, 4)
    net = nn.Sequential(layer, layer, gblr.GBLRLinear(4, 4))
    net[2].V.requires_grad_(False)
    params = [p for g in gblr.param_groups(net, lr=0.1) for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert all(p is not net[2].V for p in params)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"lr": 0.0}, ValueError),
        ({"lr": -1.0}, ValueError),
        ({"lr": "1e-3"}, TypeError),
        ({"lr": 1e-3, "structure_lr": -1e-3}, ValueError),
        ({"lr": 1e-3, "structure_lr": float("inf")}, ValueError),
        ({"lr": 1e-3, "weight_decay": -0.1}, ValueError),
        ({"lr": float("nan")}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        gblr.param_groups(model(), **kwargs)


def _adamw_reference_step(param, grad, lr, weight_decay, betas, eps=1e-8):
    """One AdamW step from zero moments, written out (decoupled decay, bias correction)."""
    first = (1 - betas[0]) * grad
    second = (1 - betas[1]) * grad * grad
    first_hat, second_hat = first / (1 - betas[0]), second / (1 - betas[1])
    return param * (1 - lr * weight_decay) - lr * first_hat / (second_hat.sqrt() + eps)


def test_adamw_is_fused_where_torch_takes_it_and_steps_as_adamw():
    from gblr.learn.groups import adamw

    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(8, 6, structure_init="half", init_cost=0.5))
    groups = gblr.param_groups(model, lr=1e-2, weight_decay=0.1)
    optimizer = adamw(groups)
    assert optimizer.defaults["fused"] is True  # torch >= 2.4 takes CPU tensors
    before = {id(p): p.detach().clone() for p in model.parameters()}
    model(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()
    for group in optimizer.param_groups:
        for param in group["params"]:
            expected = _adamw_reference_step(
                before[id(param)], param.grad, group["lr"], group["weight_decay"], group["betas"]
            )
            torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7)


def test_adamw_falls_back_to_foreach_where_fused_is_refused(monkeypatch):
    from gblr.learn.groups import adamw

    real = torch.optim.AdamW

    def no_fused(params, **options):
        if options.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be ... supported devices")
        return real(params, **options)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    optimizer = adamw(gblr.param_groups(nn.Linear(3, 2), lr=1e-3))
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
