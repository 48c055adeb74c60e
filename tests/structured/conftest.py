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
