"""Training throughput of the fine-tuning recipes' models: dense vs structured.

For each recipe model (timm ViT-B/16 at 224 px, torchvision ResNet-18 at 224 px, GPT-2
small on 1024-token windows) this times full training steps (forward, backward, AdamW,
and for GBLR the structure learner's step) on synthetic data, dense and with the
recipe's structure at the recipe's budget (a random structure of that cost: throughput
does not depend on the weights), and reports samples per second and the ratio against
dense measured in the same run (medians of the timed steps).

    python benchmarks/bench_finetune.py --device cuda --autocast bf16       # a GPU
    python benchmarks/bench_finetune.py --tiny                              # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import gblr

RECIPES = {
    # name: (budget, include pattern) as in the shipped configs
    "vit_b_16": (0.288, "blocks.*"),
    "resnet18": (0.525, "layer*"),
    "gpt2": (0.333, "transformer.h.*"),
}


def build(name: str, tiny: bool) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """A randomly initialised recipe model, one synthetic batch and the batch's kind."""
    if name == "vit_b_16":
        import timm

        kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2) if tiny else {}
        model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
        size = 32 if tiny else 224
        return model, torch.randn(8 if tiny else 64, 3, size, size), "images"
    if name == "resnet18":
        import torchvision

        size = 32 if tiny else 224
        images = torch.randn(8 if tiny else 128, 3, size, size)
        return torchvision.models.resnet18(), images, "images"
    import transformers

    config = transformers.GPT2Config(
        **(dict(n_layer=2, n_embd=64, n_head=2, n_positions=64) if tiny else {})
    )
    tokens = 64 if tiny else 1024
    ids = torch.randint(0, config.vocab_size, (4 if tiny else 8, tokens))
    return transformers.GPT2LMHeadModel(config), ids, "tokens"


def time_steps(model, batch, kind, device, autocast, steps, warmup, structured):
    model = model.to(device).train()
    batch = batch.to(device)
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-4, weight_decay=0.05))
    learner = None
    if structured and gblr.learn.groups.gblr_layers(model):
        learner = gblr.StructureLearner(model, budget=model._budget, total_steps=10**6)
    labels = torch.randint(0, 1000, (batch.shape[0],), device=device)
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            if kind == "tokens":
                loss = model(batch, labels=batch).loss
            else:
                loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if learner is not None:
            learner.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16", "none"], default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="small models (a CPU check)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--structures", nargs="+", default=["gblr", "lowrank"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.autocast]
    rows = []
    for name in args.recipes:
        budget, include = RECIPES[name]
        torch.manual_seed(0)
        model, batch, kind = build(name, args.tiny)
        dense = time_steps(model, batch, kind, device, autocast, args.steps, args.warmup, False)
        rows.append({"recipe": name, "structure": "dense", "samples_per_s": dense, "ratio": 1.0})
        print(f"{name:9} dense    {dense:9.1f} samples/s")
        for structure in args.structures:
            if structure == "lowrank" and name == "resnet18":
                continue  # the baseline families structure linear layers, not convolutions
            torch.manual_seed(0)
            model, batch, kind = build(name, args.tiny)
            config = gblr.compress.config_class(structure)(
                budget=budget, init="random", include=include, min_features=1
            )
            gblr.convert(model, config)
            model._budget = budget
            speed = time_steps(model, batch, kind, device, autocast, args.steps, args.warmup, True)
            rows.append(
                {"recipe": name, "structure": structure, "samples_per_s": speed,
                 "ratio": speed / dense, "budget": budget}
            )  # fmt: skip
            print(f"{name:9} {structure:8} {speed:9.1f} samples/s  ({speed / dense:.2f}x dense)")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine or platform.machine(),
        "torch": torch.__version__,
        "device": args.device,
        "autocast": args.autocast,
        "tiny": args.tiny,
        "rows": rows,
    }
    output = Path(args.output or f"benchmarks/results/bench_finetune_{device.type}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
