"""Deployment: freeze a trained GBLR model into its exact inference form, choose an
execution plan per layer, device and input size, and save/load it without training code.

    model = gblr.freeze(model)                  # exact eval-mode matrices, live components
    report = gblr.plan(model, example_input)    # time the plans per layer; print(report)
    gblr.save(model, "model.safetensors")       # tensors + structure JSON + sha256
    model = gblr.load("model.safetensors")      # or load(path, model_factory=MyModel)

ONNX: the ``dense`` and ``lowrank`` plans are plain ``F.linear`` / ``F.conv2d`` calls on
cached tensors and are what an export should use (set ``layer.plan`` before exporting);
``segment`` and ``blocksparse`` are Python loops over slices whose structure would be
unrolled into the graph, and ``triton`` (CUDA only) is a custom kernel. Export is not
tested in this environment (the ``onnx`` package is not installed;
``tests/deploy/test_io.py`` runs the export when it is).
"""

from .frozen import PLAN_CHOICES, FrozenGBLRConv2d, FrozenGBLRLinear, FrozenGBLRMatrix, freeze
from .io import FrozenCheckpoint, load, load_checkpoint, save
from .planner import LayerPlan, PlanReport, plan
from .plans import GPU_PLANS, PLANS

__all__ = [
    "GPU_PLANS",
    "PLANS",
    "PLAN_CHOICES",
    "FrozenCheckpoint",
    "FrozenGBLRConv2d",
    "FrozenGBLRLinear",
    "FrozenGBLRMatrix",
    "LayerPlan",
    "PlanReport",
    "freeze",
    "load",
    "load_checkpoint",
    "plan",
    "save",
]
