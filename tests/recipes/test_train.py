import json
import warnings

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("torchvision")
pytest.importorskip("yaml")
from gblr.cli import main
from gblr.recipes.config import load_config
from gblr.recipes.data import batch_mixer, digits, load_cifar
from gblr.recipes.models import mixer_small_patch4_32, vit_small_patch4_32
from gblr.recipes.train import build_structured_model, run_length

from .fixtures import write_cifar

# The shipped CIFAR configs, shrunk to seconds on the pickle fixture (40 training images).
TINY = [
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "optim.batch_size=8",
    "optim.epochs=2",
    "optim.warmup=1",
    "learner.sigma_start=1",
    "learner.budget_ramp=1",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=5",
]


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar(tmp_path / "data", 10, per_batch=8)
    return tmp_path / "data"


def test_paper_models_have_the_paper_sizes():
    vit, mixer = vit_small_patch4_32(), mixer_small_patch4_32(num_classes=100)
    assert len(vit.blocks) == 12 and vit.blocks[0].qkv.weight.shape == (1152, 384)
    assert vit.blocks[0].fc1.weight.shape == (1536, 384) and vit.position.shape == (1, 65, 384)
    assert len(mixer.blocks) == 8 and mixer.head.weight.shape == (100, 512)
    assert mixer.blocks[0].token_mlp.fc1.weight.shape == (256, 64)  # 64 patches of 4x4
    assert mixer.blocks[0].channel_mlp.fc1.weight.shape == (2048, 512)
    images = torch.randn(2, 3, 32, 32)
    assert vit(images).shape == (2, 10) and mixer(images).shape == (2, 100)


def test_run_length_counts_epochs_at_the_global_batch(cifar_root):
    config = load_config("cifar10-vit-s-gblr", [f"data.root={cifar_root}"])
    assert run_length(config, 50_000) == (300 * 48, 48.0)  # 50000 // 1024 steps per epoch
    with pytest.raises(ValueError, match="larger than the training set"):
        run_length(config, 1000)


@pytest.mark.parametrize("structure", ["gblr", "lowrank"])
def test_mixer_structure_follows_the_config(structure):
    config = load_config(
        "cifar10-mixer-s-gblr",
        ["data.root=x", "model.dim=64", "model.depth=2", f"structure.kind={structure}"],
    )
    model = build_structured_model(config, 3, 10)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("fc1", "fc2"))}
    assert kinds == {"GBLRLinear" if structure == "gblr" else "LowRankLinear"}
    assert type(model.head).__name__ == "Linear"  # head and patch embedding stay dense


def test_batch_mixer_gives_soft_labels():
    assert batch_mixer(0.0, 0.0) is None
    with pytest.raises(ValueError, match="mixup must be >= 0"):
        batch_mixer(-1.0, 0.0)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed, soft = batch_mixer(mixup, cutmix, num_classes=10)(images, labels)
        assert mixed.shape == images.shape and soft.shape == (8, 10)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        assert not torch.equal(mixed, images)  # a batch really was mixed


def test_cifar_augmentation_and_digits_upsampling(cifar_root):
    plain = load_cifar(cifar_root, train=True, verify=False)
    augmented = load_cifar(cifar_root, train=True, augment="autoaugment", verify=False)
    assert len(augmented) == len(plain) == 40
    torch.manual_seed(0)
    first, label = augmented[3]
    second, _ = augmented[3]
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert int(label) == int(plain[3][1]) and not torch.equal(first, second)
    with pytest.raises(ValueError, match="augment must be one of"):
        load_cifar(cifar_root, augment="randaugment")
    train, _ = digits(image_size=16)
    assert train.tensors[0].shape[1:] == (1, 16, 16)


def test_train_command_runs_a_shipped_cifar_config_end_to_end(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    # fixture files in CIFAR's format, not the official release (see test_data_safety)
    argv = ["train", "--config", "cifar10-vit-s-gblr", f"data.root={cifar_root}"]
    argv += ["data.verify=false"]
    argv += TINY
    assert main([*argv, "--out", str(out), "--logger", "both", "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["result"]["steps"] == 10  # 2 epochs of 40 images at batch 8
    assert result["config"]["data"]["mixup"] == 0.8  # the shipped augmentation ran
    # the learner brought the blocks to the config's budget (0.0667 of dense)
    assert result["result"]["macs_ratio"] <= 0.0667 + 1e-9
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val/accuracy" in header and "gblr/macs_ratio" in header  # validated every epoch
    assert "figures/masks.png" in (out / "REPORT.md").read_text()
    capsys.readouterr()

    # the same run folder resumed with another structure is refused, and left alone
    config_before = (out / "config.yaml").read_text()
    assert main([*argv, "--out", str(out), "--structure", "lowrank", "--resume"]) == 1
    error = capsys.readouterr().err
    assert "another structure" in error and "GBLRLinear there, LowRankLinear here" in error
    assert (out / "config.yaml").read_text() == config_before
    # resuming the finished run with its own config is accepted (nothing left to do)
    assert main([*argv, "--out", str(out), "--resume", "--quiet"]) == 0

    # gblr flops reads the run folder and the checkpoint through the saved config
    assert main(["flops", str(out)]) == 0
    table = capsys.readouterr().out
    assert "blocks.0.qkv" in table and "GBLR" in table
    assert "whole model, one 3x32x32 image" in table and "GFLOPs" in table
    assert main(["flops", str(out / "checkpoints" / "last.ckpt")]) == 0
    assert "step 10" in capsys.readouterr().out


def test_train_command_baseline_mixer_gets_its_own_folder(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # fixture files in CIFAR's format, not the official release (see test_data_safety)
    argv = ["train", "--config", "cifar100-mixer-s-gblr", f"data.root={cifar_root}"]
    argv += ["data.verify=false"]
    argv += TINY
    write_cifar(cifar_root, 100, per_batch=8)
    assert main([*argv, "--structure", "lowrank", "--budget", "0.25", "--quiet"]) == 0
    out = tmp_path / "runs" / "cifar100-mixer-s-lowrank"
    result = json.loads((out / "results.json").read_text())["result"]
    assert result["structure"] == "lowrank" and result["macs_ratio"] <= 0.25
    assert not (tmp_path / "runs" / "cifar100-mixer-s-gblr").exists()


def test_train_command_errors_a_person_can_act_on(tmp_path, capsys):
    assert main(["train", "--config", "cifar10-vit-s-gblr", f"data.root={tmp_path}"]) == 1
    assert "cifar-10-batches-py" in capsys.readouterr().err  # where it looked
    assert main(["train", "--config", "digits-vit-gblr", "optim.lrr=1"]) == 1
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train"]) == 1
    assert "--config is required" in capsys.readouterr().err
    assert main(["train", "digits-vit-gblr"]) == 1  # a config named where key=value goes
    assert "write --config digits-vit-gblr" in capsys.readouterr().err
    assert main(["train", "--list"]) == 0
    assert "cifar10-vit-s-gblr" in capsys.readouterr().out


def test_resumed_config_run_keeps_its_earlier_metrics(tmp_path):
    from gblr.recipes.train import train_from_config

    config = load_config(
        "digits-vit-gblr",
        [
            *("model.dim=32", "model.depth=1", "model.heads=2", "optim.steps=12"),
            *("optim.warmup=4", "trainer.log_every_n_steps=1"),
            *("trainer.checkpoint_every_n_steps=6", f"out={tmp_path / 'run'}"),
        ],
    )
    train_from_config(config, progress=False, stop_after=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_from_config(config, progress=False, resume="last")
    assert result["steps"] == 12
    # Lightning's warning about the checkpoint folder it resumes from said nothing
    assert not [w for w in caught if "Checkpoint directory" in str(w.message)]
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    steps = [int(float(row.split(",")[lines[0].split(",").index("step")])) for row in lines[1:]]
    # rows from before the interruption (Lightning's logger alone would have deleted them)
    assert min(steps) < 6 and max(steps) >= 11
    assert not (tmp_path / "run" / "metrics.before-resume.csv").exists()
