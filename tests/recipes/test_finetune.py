"""The paper's fine-tuning recipes, run a few steps on small fixtures with tiny random
models of the same classes (timm, torchvision; GPT-2 in test_finetune_text.py)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("torchvision")
pytest.importorskip("yaml")
from gblr.cli import main
from gblr.recipes.config import load_config
from gblr.recipes.train import model_from_run

from .fixtures import write_image_folders

CPU = [
    "optim.batch_size=4",
    "optim.epochs=2",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=2",
]
# the shipped ViT-B/16 recipe with a tiny ViT of timm's class, random weights
TINY_VIT = [
    "model.pretrained=false",
    "model.image_size=32",
    "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "structure.search_steps=0",
]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return write_image_folders(tmp_path_factory.mktemp("imagenet"), classes=6, per_class=4)


def test_vit_b_recipe_searches_fine_tunes_resumes_and_reports(imagenet_root, tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "vit"
    argv = ["finetune", "--config", "imagenet-vit-b-gblr", f"data.root={imagenet_root}"]
    argv += [*TINY_VIT, *CPU, "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())["result"]
    assert result["steps"] == 12  # 24 images, global batch 4, 2 epochs
    assert 0.0 <= result["accuracy"] <= result["top5"] <= 1.0
    assert "top-5" in printed and "GFLOPs per example" in printed
    # the search met the budget in the blocks and the learner kept it (sigma stays inf)
    assert result["macs_ratio"] <= 0.288 + 1e-6
    assert result["gflops"] < result["dense_gflops"]
    model, _, example = model_from_run(out)
    assert type(model.blocks[0].attn.qkv).__name__ == "GBLRLinear"
    assert float(model.blocks[0].attn.qkv.sigma) == float("inf")
    assert model(example).shape == (1, 6)
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val/top5" in header  # validated every epoch with top-5

    # resuming the finished run with its own recipe works; another structure is refused
    assert main([*argv, "--resume"]) == 0
    assert main([*argv, "--resume", "--structure", "lowrank", "--out", str(out)]) == 1
    assert "another structure" in capsys.readouterr().err


def test_resnet18_recipe_structures_convolutions_and_resumes(imagenet_root, tmp_path):
    from gblr.recipes.train import train_from_config

    out = tmp_path / "resnet"
    # searching all 19 convolutions of ResNet-18 takes minutes on 2 cores; the first
    # stage's convolutions are searched, as the recipe does for every stage
    overrides = [f"data.root={imagenet_root}", "model.pretrained=false", "model.image_size=32"]
    overrides += ["structure.include=layer1.*", "structure.search_steps=0", *CPU, f"out={out}"]
    # interrupted after 6 of 12 steps, then resumed from its checkpoint by the command
    train_from_config(load_config("imagenet-resnet18-gblr", overrides), stop_after=6)
    assert main(["finetune", "--config", "imagenet-resnet18-gblr", *overrides, "--resume"]) == 0
    result = json.loads((out / "results.json").read_text())["result"]
    assert result["steps"] == 12 and result["macs_ratio"] <= 0.525 + 1e-6
    steps = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    column = steps[0].index("step")
    logged = {int(float(row[column])) for row in steps[1:]}
    assert min(logged) < 6 and max(logged) >= 11  # both halves of the run are in the log
    model, _, example = model_from_run(out)
    assert type(model.layer1[0].conv1).__name__ == "GBLRConv2d"
    assert type(model.layer2[0].conv1).__name__ == "Conv2d"  # outside the include
    with torch.no_grad():
        assert model(example).shape == (1, 6)


def test_finetune_config_errors_and_listing(tmp_path, capsys):
    assert main(["finetune", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("imagenet-vit-b-gblr", "imagenet-resnet18-gblr", "wikitext103-gpt2-gblr"):
        assert name in listing
    root = f"data.root={tmp_path}"
    assert main(["finetune", "--config", "imagenet-resnet18-gblr", root, *CPU]) == 1
    assert f"no image folder at {tmp_path}/train" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"model\.source must name"):
        load_config("imagenet-vit-b-gblr", ["model.source=null"])
    with pytest.raises(ValueError, match="language models take wikitext103, text"):
        load_config("imagenet-vit-b-gblr", ["data.name=wikitext103"])


def test_sweep_runs_every_structure_and_budget_once(tmp_path, capsys):
    base = ["sweep", "--config", "digits-vit-gblr", "model.dim=32", "model.depth=1"]
    base += ["model.heads=2", "optim.steps=8", "optim.warmup=4", "--quiet"]
    argv = [*base, "--structures", "dense", "gblr", "lowrank", "--budgets", "0.3", "0.5"]
    argv += ["--out", str(tmp_path / "sweep")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [(r["structure"], r["budget"]) for r in rows] == [
        ("dense", 1.0),
        ("gblr", 0.3),
        ("gblr", 0.5),
        ("lowrank", 0.3),
        ("lowrank", 0.5),
    ]
    gflops = {(r["structure"], r["budget"]): r["gflops"] for r in rows}
    assert gflops["gblr", 0.3] < gflops["gblr", 0.5] < gflops["dense", 1.0]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    assert "| lowrank | 0.5 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # finished runs are read back, not trained again
    assert capsys.readouterr().out.count("done before") == 5
    assert main([*base, "--structures", "butterfly"]) == 1
    assert "unknown ['butterfly']" in capsys.readouterr().err


def test_sweep_budgets_that_print_alike_get_their_own_folders():
    """Budgets equal to six digits (0.1, 0.1000001) shared the folder `gblr-0.1`: the
    second run found the first's results there. Each distinct budget now names its own
    folder, and a budget given twice runs once."""
    from gblr.recipes.config import load_config
    from gblr.recipes.sweep import budget_label, sweep_runs

    config = load_config("digits-vit-gblr", ["trainer.logger=none"])
    runs = sweep_runs(config, ["gblr"], [0.1, 0.1000001, 0.1, 0.3], Path("sweep"))
    assert [Path(run.out).name for run in runs] == ["gblr-0.1", "gblr-0.1000001", "gblr-0.3"]
    assert [run.structure.budget for run in runs] == [0.1, 0.1000001, 0.3]
    for budget in (0.1, 0.25, 1 / 3, 0.3333333, 1e-7, 1.0):
        assert float(budget_label(budget)) == budget


def test_train_prints_top5_only_with_more_than_five_classes(tmp_path, capsys):
    """With four classes every sample is in the top 5: `gblr train` printed "top-5
    1.0000" as if it measured something."""
    root = write_image_folders(tmp_path / "images", classes=4, per_class=2, size=16)
    argv = ["train", "--config", "digits-vit-gblr", "data.name=folder"]
    argv += [f"data.root={root}/train", f"data.val_root={root}/val", "model.image_size=16"]
    argv += ["model.patch_size=4", "model.dim=16", "model.depth=1", "model.heads=2"]
    argv += ["optim.steps=2", "optim.warmup=1", "optim.batch_size=4", "trainer.logger=none"]
    argv += ["structure.start=blockdiag", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "top-5" not in printed
