import json
import subprocess
import sys

import pytest

import gblr
from gblr.cli import main


def test_fit_matrix_learns_a_structure_better_than_svd(capsys):
    args = ["fit-matrix", "--steps", "800", "--rows", "48", "--cols", "64", "--budget", "0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    gblr_error = float(rows["GBLR"][-1])
    svd_error = float(rows["truncated"][-1])
    gblr_ratio = float(rows["GBLR"][-2])
    assert 0.45 < gblr_ratio <= 0.5  # the learner meets the budget
    # Learned intervals capture the block structure that SVD at equal MACs cannot
    # (measured 2026-11-26: 0.22 vs 0.54; the bound leaves room for seed noise).
    assert gblr_error < 0.5 * svd_error


def test_version_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "gblr.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and gblr.__version__ in result.stdout
    assert main([]) == 2


def test_bad_demo_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit-matrix", "--budget", "1.5"])
    assert "--budget must be in (0, 1]" in capsys.readouterr().err
    for side, value in (("--cols", "1"), ("--rows", "100000")):  # was a crash inside torch
        with pytest.raises(SystemExit):
            main(["fit-matrix", side, value])
        assert f"argument {side}: an integer from 8 to 4096, got {value}" in (
            capsys.readouterr().err
        )
    with pytest.raises(SystemExit):
        main(["demo", "--start-cost", "0"])
    assert "--start-cost must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--structures", "gblr", "butterfly"])
    assert "unknown ['butterfly']" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_short_setting_end_to_end(tmp_path, capsys):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out = tmp_path / "report"
    # three of the five default models: the others train the same way (CI's time)
    structures = ["dense", "gblr", "lowrank"]
    arguments = ["demo", "--steps", "150", "--budget", "0.3", "--quiet", "--out", str(out)]
    assert main([*arguments, "--structures", *structures]) == 0
    results = {r["structure"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(results) == structures
    # The GBLR run ends within its MACs target; the baselines stay within it. Measured
    # 2026-12-04 with the block-diagonal start at 1.25x the budget: 0.227 (the budget ramp
    # removes whole one-line strips, not cells, and overshoots in 150 steps; issue 19);
    # 2026-12-05 with the "blocks" start at 2x: 0.299, accuracy 0.82 (at 3x the 50-step
    # ramp killed the model: 0.13, which the accuracy floor below catches, until the full
    # components' starts were spread; at 3x with the spread: 0.300, accuracy 0.70).
    assert 0.2 <= results["gblr"]["macs_ratio"] <= 0.3
    assert results["lowrank"]["macs_ratio"] <= 0.3
    assert results["dense"]["macs_ratio"] == 1.0
    # Measured 2026-11-26 at 150 steps: dense 0.82, GBLR 0.56, low-rank 0.64, Monarch 0.66
    # (10 classes: chance is 0.10).
    assert results["dense"]["accuracy"] >= 0.6
    assert min(r["accuracy"] for r in results.values()) >= 0.35
    written = (out / "results.md").read_text()
    assert "| gblr |" in written
    # the command recorded trains the same models into the same folder
    assert f"--structures dense gblr lowrank --out {out}" in written
    assert all((out / name / "metrics.csv").is_file() for name in results)
    # one report per model; the GBLR one shows its learned masks
    markdown = (out / "gblr" / "REPORT.md").read_text()
    for figure in ("masks.png", "macs_per_layer.png", "training.png"):
        assert f"figures/{figure}" in markdown
        assert (out / "gblr" / "figures" / figure).stat().st_size > 10_000
    assert "masks.png" not in (out / "dense" / "REPORT.md").read_text()
    assert main(["flops", str(out / "gblr")]) == 0
    table = capsys.readouterr().out
    assert "blocks.0.qkv" in table and "GBLR" in table
    # the GBLR run let the recipes' start probe choose its start, and says which
    assert results["gblr"]["start"] in ("blockdiag", "blocks")
    assert f"gblr: its start probe chose the {results['gblr']['start']} start" in table
    saved = (out / "gblr" / "config.yaml").read_text()
    assert f"start: {results['gblr']['start']}" in saved


def test_report_and_flops_say_what_is_missing(tmp_path, capsys):
    assert main(["flops", str(tmp_path)]) == 1
    assert "no model state at" in capsys.readouterr().err
