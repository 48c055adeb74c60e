"""`--smoke`: a documented command's whole pipeline in seconds, marked as not a result, and
never mixed with a real run."""

import json

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("yaml")
pytest.importorskip("matplotlib")
from gblr.cli import main
from gblr.recipes.config import load_config
from gblr.recipes.smoke import _hf_model_type, smoke_config
from gblr.recipes.train import train_from_config

from .fixtures import write_cifar


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a busy machine
    yield
    torch.set_num_threads(threads)


def test_smoke_run_of_a_multi_gpu_command(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", "cifar10-vit-s-gblr", f"data.root={tmp_path / 'none'}"]
    argv += ["--devices", "8", "--num-nodes", "4", "--strategy", "ddp"]
    argv += ["--precision", "bf16-mixed", "--quiet", "--smoke"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # the output names every requested setting it overrode
    for change in (
        "trainer.devices: 8 -> 1",
        "trainer.num_nodes: 4 -> 1",
        "trainer.strategy: 'ddp' -> 'auto'",
        "trainer.precision: 'bf16-mixed' -> '32-true'",
        "optim.epochs: 300 -> None",
        "model.dim: 384 -> 16",
    ):
        assert change in printed
    assert "no cifar10 data at" in printed and "SMOKE RUN, not a result" in printed
    out = tmp_path / "runs" / "cifar10-vit-s-gblr"
    # the stand-in is in the official format, read by the config's own pipeline
    assert (out / "smoke-data" / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["result"]["smoke"] is True and results["config"]["smoke"] is True
    assert results["result"]["steps"] == 2
    assert results["config"]["data"]["augment"] == "autoaugment"  # the pipeline is the config's
    assert (out / "checkpoints" / "last.ckpt").is_file()
    report = (out / "REPORT.md").read_text()
    assert report.startswith("> **Smoke run**")
    for figure in ("masks.png", "macs_per_layer.png", "training.png"):
        assert (out / "figures" / figure).stat().st_size > 5_000
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val/top5" in header  # the config validates each epoch: the smoke run once
    assert main(["flops", str(out)]) == 0
    assert "[smoke run: a tiny stand-in model" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0  # rewritten, still marked
    assert (out / "REPORT.md").read_text().startswith("> **Smoke run**")


def test_smoke_run_reads_real_data_when_present(tmp_path):
    pytest.importorskip("torchvision")
    write_cifar(tmp_path / "cifar", classes=10, per_batch=16)
    config = load_config(
        "cifar10-mixer-s-gblr", [f"data.root={tmp_path / 'cifar'}", f"out={tmp_path / 'run'}"]
    )
    smoke, notes = smoke_config(config, steps=3)
    assert smoke.data.root == str(tmp_path / "cifar")
    assert any("the real cifar10 data" in note for note in notes)
    assert not (tmp_path / "run" / "smoke-data").exists()
    assert (smoke.model.name, smoke.model.depth, smoke.optim.steps) == ("mixer", 1, 3)
    assert smoke.structure == config.structure  # kind, budget, layers and start unchanged
    result = train_from_config(smoke, progress=False)
    assert result["steps"] == 3 and result["smoke"] is True


def test_smoke_models_keep_their_library_class(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    root = f"data.root={tmp_path / 'none'}"
    resnet, _ = smoke_config(load_config("imagenet-resnet18-gblr", [root, f"out={tmp_path}/r"]))
    assert (resnet.model.name, resnet.model.source, resnet.model.pretrained) == (
        "torchvision",
        "resnet18",
        False,
    )
    # a structure search of all 19 convolutions takes minutes: the first block's only
    assert resnet.structure.include == ["layer1.0.conv1", "layer1.0.conv2"]
    assert resnet.structure.search_steps == 0 and resnet.structure.init == "search"
    vit, _ = smoke_config(load_config("imagenet-vit-b-gblr", [root, f"out={tmp_path}/v"]))
    assert vit.model.source == "vit_base_patch16_224" and vit.model.kwargs["depth"] == 2
    assert vit.structure.include == "blocks.*" and vit.model.image_size == 32


def test_hugging_face_model_type_without_the_network(tmp_path):
    pytest.importorskip("transformers")
    assert _hf_model_type("Graphcore/gpt2-wikitext-103")[0] == "gpt2"
    assert _hf_model_type("EleutherAI/gpt-neo-125m")[0] == "gpt_neo"
    assert _hf_model_type("gpt2") == ("gpt2", "model.source names it")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _hf_model_type(str(tmp_path))[0] == "llama"
    with pytest.raises(ValueError, match=r"model.source='someone/mystery'.*model.source=TYPE"):
        _hf_model_type("someone/mystery")


def test_a_smoke_run_never_mixes_with_a_real_run(tmp_path):
    tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
    tiny += ["trainer.logger=csv", f"out={tmp_path / 'run'}"]
    config = load_config("digits-vit-gblr", tiny)
    smoke, _ = smoke_config(config)
    train_from_config(smoke, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # a real run does not resume a smoke run's checkpoint...
    with pytest.raises(ValueError, match="holds a smoke run"):
        train_from_config(config, resume="last", progress=False)
    # ...and starting afresh removes the smoke run's files first
    train_from_config(config, progress=False)
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "smoke" not in result["result"] and not result["config"]["smoke"]
    assert not (tmp_path / "run" / "REPORT.md").read_text().startswith("> **Smoke")
    # a smoke run refuses the real run's folder
    with pytest.raises(ValueError, match="not a smoke run; --smoke would overwrite it"):
        smoke_config(config)
    with pytest.raises(ValueError, match="not a smoke run"):
        train_from_config(smoke, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        smoke_config(config, steps=0, data_dir=tmp_path / "elsewhere" / "data")


def test_sweeps_reuse_only_runs_of_their_own_kind(tmp_path, capsys):
    base = ["sweep", "--config", "digits-vit-gblr", "model.dim=16", "model.depth=1"]
    base += ["model.heads=2", "optim.steps=2", "--structures", "dense", "--quiet"]
    base += ["--out", str(tmp_path / "sweep")]
    assert main([*base, "--smoke"]) == 0
    assert (tmp_path / "sweep" / "sweep.md").read_text().startswith("> **Smoke run**")
    capsys.readouterr()
    assert main(base) == 0  # the smoke run is not taken for the real one
    assert "done before" not in capsys.readouterr().out
    assert not (tmp_path / "sweep" / "sweep.md").read_text().startswith("> **Smoke")
    assert main(base) == 0
    assert "done before" in capsys.readouterr().out
    assert main([*base, "--smoke"]) == 1  # nor the other way round
    assert "not a smoke run" in capsys.readouterr().err


def test_demo_smoke_marks_its_outputs_and_spares_a_real_demo(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    argv = ["demo", "--structures", "gblr", "--quiet", "--out", str(out), "--smoke"]
    assert main(argv) == 0
    assert "SMOKE RUN, not a result" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["settings"]["smoke"] is True
    assert (out / "results.md").read_text().startswith("> **Smoke run**")
    assert (out / "gblr" / "REPORT.md").read_text().startswith("> **Smoke run**")
    real = json.loads((out / "results.json").read_text())
    real["settings"]["smoke"] = False
    (out / "results.json").write_text(json.dumps(real))
    assert main(argv) == 1
    assert "not a smoke run" in capsys.readouterr().err
