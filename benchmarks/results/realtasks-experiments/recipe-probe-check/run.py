"""The recipes' default (the start probe) against structure.start=blockdiag, via gblr train's
own path (train_from_config), digits-vit-gblr at budget 0.1, ViT and Mixer, seeds 0-2."""
import json, sys, logging, warnings
import torch
torch.set_num_threads(1)
import lightning.pytorch
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.simplefilter("ignore")
from gblr.recipes.config import load_config
from gblr.recipes.train import train_from_config
model, seed, variant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
overrides = ["structure.budget=0.1", f"seed={seed}", "trainer.logger=none", "trainer.accelerator=cpu",
             f"out=/work/scratch/recipe-check/runs/{model}-{variant}-{seed}"]
if model == "mixer":
    overrides += ["model.name=mixer"]
if variant == "blockdiag":
    overrides += ["structure.start=blockdiag"]
result = train_from_config(load_config("digits-vit-gblr", overrides), progress=False, overwrite=True)
line = {"model": model, "seed": seed, "variant": variant, **{k: result.get(k) for k in ("accuracy", "macs_ratio", "seconds", "start", "probe_seconds")}}
with open("/work/scratch/recipe-check/results.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
print(line)
