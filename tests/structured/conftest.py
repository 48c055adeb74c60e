import math

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_macs(layer, in_features):
    """MACs the layer's forward really performs for one input row, counted by torch's
    FlopCounterMode on the matrix products it executes (FLOPs / 2), independently of the
    layer's own flops() formula. The bias is disabled while counting."""
    bias, layer.bias = layer.bias, None
    try:
        x = torch.randn(1, in_features, dtype=next(layer.parameters()).dtype)
        with FlopCounterMode(display=False) as counter:
            layer(x)
        return counter.get_total_flops() // 2
    finally:
        layer.bias = bias


def allowed_macs(dense_macs, budget=None, budget_macs=None):
    """The MACs a family's budget allows, worked out here rather than by gblr: the count
    ``budget_macs``, or the fraction ``budget`` of ``dense_macs`` rounded down."""
    return budget_macs if budget_macs is not None else math.floor(budget * dense_macs)
