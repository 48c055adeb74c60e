"""Deployment: freeze a trained GBLR model into its exact inference form, choose an
execution plan per layer, device and input size, and save/load it without training code.

    model = gblr.freeze(model)                  # exact eval-mode matrices, live components
    report = gblr.plan(model, example_input)    # time the plans per layer; print(report)
    gblr.save(model, "model.safetensors")       # tensors + structure JSON + sha256
    model = gblr.load("model.safetensors")      # or load(path, model_factory=MyModel)

ONNX: [`export_onnx`][gblr.deploy.export.export_onnx] exports a copy of the model in which every
frozen layer is a dense or a low-rank product in plain ``nn.Linear``/``nn.Conv2d`` modules (the
``segment``, ``panels`` and ``blocksparse`` plans are Python loops over slices, ``triton`` a custom
kernel), and checks the file with ``onnxruntime``.
"""

from .export import ONNX_PLANS, OnnxExport, export_onnx
from .frozen import PLAN_CHOICES, FrozenGBLRConv2d, FrozenGBLRLinear, FrozenGBLRMatrix, freeze
from .io import FrozenCheckpoint, GBLRFileError, is_gblr_file, load, load_checkpoint, save
from .planner import LayerPlan, PlanReport, plan
from .plans import GPU_PLANS, PLANS

__all__ = [
    "GPU_PLANS",
    "ONNX_PLANS",
    "PLANS",
    "PLAN_CHOICES",
    "FrozenCheckpoint",
    "FrozenGBLRConv2d",
    "FrozenGBLRLinear",
    "FrozenGBLRMatrix",
    "GBLRFileError",
    "LayerPlan",
    "OnnxExport",
    "PlanReport",
    "export_onnx",
    "freeze",
    "is_gblr_file",
    "load",
    "load_checkpoint",
    "plan",
    "save",
]
