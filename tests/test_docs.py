"""The documentation cannot rot: the site builds strictly, every code block of the guides
runs (python blocks here, included example scripts in test_examples.py), every documented
command line is accepted by the `gblr` parser and its config loads, every documented `gblr`
command runs (training commands as smoke runs, `--smoke`, in the page's order, so that
`gblr report`/`gblr flops` read the run folders the commands above them wrote), and the
docstring examples of the public API run."""

import doctest
import importlib
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gblr

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)
# An example script shown in a page: written out (so that GitHub shows the code, where an
# include line would show only its path) after a marker naming the script
MIRROR = re.compile(r"<!-- mirror: (\S+) -->\n```python\n(.*?)```", re.S)


def blocks(language: str) -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S):
            found.append((page, block))
    return found


def test_site_builds_strictly(tmp_path):
    if shutil.which("mkdocs") is None:
        pytest.importorskip("mkdocs")  # installed by the [dev] extra
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").stat().st_size > 100_000
    # the changelog page shows CHANGELOG.md itself (docs/_hooks/changelog.py), not a pointer
    changelog = (tmp_path / "site" / "changelog" / "index.html").read_text()
    releases = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and all(release in changelog for release in releases), releases


def mirrors() -> list[tuple[Path, str, str]]:
    return [(page, name, code) for page in PAGES for name, code in MIRROR.findall(page.read_text())]


def test_pages_show_example_scripts_as_written_and_equal_to_the_files_ci_runs():
    found = mirrors()
    assert found, "the guides show no example"
    for page, name, code in found:
        assert name.startswith("examples/") and (ROOT / name).is_file(), (page, name)
        assert code == (ROOT / name).read_text(), f"{page} shows an old copy of {name}"
    # include lines show only a path on GitHub (the changelog page is filled by a hook)
    included = [(page, SNIPPET.findall(page.read_text())) for page in PAGES]
    assert [page.name for page, names in included if names] == []


def test_python_blocks_written_in_the_guides_run():
    shown_scripts = {code for _, _, code in mirrors()}  # they run in test_examples.py
    for page, code in blocks("python"):
        if code not in shown_scripts:
            exec(compile(code, str(page), "exec"), {})


def command_lines() -> list[tuple[Path, list[str]]]:
    lines = []
    for page, block in [*blocks("console"), ("README.md", "")]:
        if page == "README.md":
            text = (ROOT / "README.md").read_text()
            block = "\n".join(re.findall(r"```console\n(.*?)```", text, flags=re.S))
        for line in block.splitlines():
            if not line.startswith("$ "):
                continue
            for command in line[2:].split("&&"):
                words = shlex.split(command, comments=True)
                if words:
                    lines.append((page, words))
    return lines


def _command_id(value):
    return " ".join(value)[:60] if isinstance(value, list) else ""


@pytest.mark.parametrize(("page", "words"), command_lines(), ids=_command_id)
def test_documented_commands_parse_and_their_configs_load(page, words):
    if words[0] == "pip":
        extras = re.search(r"\[(\w+)\]", " ".join(words))
        pyproject = (ROOT / "pyproject.toml").read_text()
        assert extras and f"\n{extras.group(1)} = [" in pyproject, (page, words)
        return
    if words[0] in ("python", "mkdocs"):
        assert (ROOT / words[1]).is_file() or words[0] == "mkdocs", (page, words)
        return
    assert words[0] == "gblr", (page, words)
    from gblr.cli import build_parser

    args = build_parser().parse_args(words[1:])  # exits (fails the test) if it does not parse
    if getattr(args, "config", None):
        from gblr.cli import _config_from_args

        _config_from_args(args)  # the config exists, the overrides name real keys


TRAINING = ("train", "finetune", "sweep", "demo")


def pages_with_gblr_commands() -> list[str]:
    pages = [str(page) for page, words in command_lines() if words[0] == "gblr"]
    return list(dict.fromkeys(pages))


def _page_id(page: str) -> str:
    return str(Path(page).relative_to(ROOT)) if Path(page).is_absolute() else page


@pytest.mark.parametrize("page", pages_with_gblr_commands(), ids=_page_id)
def test_documented_commands_run_as_smoke_runs(page, tmp_path, monkeypatch, capsys):
    """Each page's `gblr` commands, in order, in a fresh folder whose home holds no data:
    every training command with `--smoke` (a tiny model of the config's family, stand-in
    data in the real format, 2 steps on the CPU), the others as written."""
    for module in ("lightning.pytorch", "yaml", "matplotlib", "sklearn", "PIL"):
        pytest.importorskip(module)
    from gblr.cli import main

    commands = [words for p, words in command_lines() if str(p) == page and words[0] == "gblr"]
    needs = " ".join(" ".join(words) for words in commands)
    for config, module in (("imagenet-vit-b", "timm"), ("resnet18", "torchvision")):
        if config in needs:
            pytest.importorskip(module)
    if "gpt2" in needs:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/data, ~/imagenet: not there
    # Each run's REPORT.md figures are built but not drawn: drawing costs ~1.3 s of CPU
    # per run (matplotlib's layout), most of this test's time over ~40 runs. A smoke
    # run's drawn report is checked in tests/recipes/test_smoke.py.
    from gblr.recipes import report

    monkeypatch.setattr(report, "_savefig", lambda figure, path: path.write_bytes(b""))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to a busy CI
    try:
        _run_page(page, commands, capsys, main)
    finally:
        torch.set_num_threads(threads)
    # every run is marked as a smoke run where its numbers are written
    results = list(tmp_path.glob("**/results.json"))
    assert results or not any(w[1] in TRAINING for w in commands if "--list" not in w)
    for path in results:
        data = json.loads(path.read_text())
        assert data.get("result", {}).get("smoke") or data.get("settings", {}).get("smoke")
    for path in tmp_path.glob("**/REPORT.md"):
        assert path.read_text().startswith("> **Smoke run**"), path


def _run_page(page, commands, capsys, main):
    for words in commands:
        argv = words[1:]
        smoke = argv[0] in TRAINING and "--list" not in argv
        if smoke:
            argv = [*argv, "--smoke"]
        code = main(argv)
        printed = capsys.readouterr()
        assert code == 0, (
            f"{_page_id(page)}: `gblr {' '.join(argv)}` failed:\n{printed.err[-3000:]}"
        )
        if smoke:
            assert "SMOKE RUN, not a result" in printed.out, argv
        if argv[0] in ("flops", "report"):  # read the run folder a smoke run above wrote
            assert "smoke run" in printed.out or "REPORT.md" in printed.out, printed.out
        if argv[0] == "flops":
            assert "[smoke run" in printed.out and "whole model" in printed.out, printed.out


PUBLIC = [getattr(gblr, name) for name in gblr.__all__ if not name.startswith("__")]
PUBLIC += [getattr(gblr.structured, name) for name in gblr.structured.__all__]
PUBLIC += [getattr(gblr.special, name) for name in gblr.special.__all__]
DOCUMENTED_MODULES = [
    "gblr.recipes.config",
    "gblr.recipes.engine",
    "gblr.recipes.start_probe",
    "gblr.recipes.data",
    "gblr.recipes.text",
    "gblr.recipes.models",
    "gblr.recipes.engine_config",
    "gblr.recipes.checkpoints",
    "gblr.recipes.build",
    "gblr.recipes.train",
    "gblr.recipes.run_folder",
    "gblr.recipes.smoke",
    "gblr.recipes.sweep",
    "gblr.recipes.report",
    "gblr.deploy",
    "gblr.files",
    "gblr.modules",
    "gblr.tables",
    "gblr.integrations.lightning",
    "gblr.integrations.hf",
]
for _name in DOCUMENTED_MODULES:
    _module = importlib.import_module(_name)
    PUBLIC += [getattr(_module, name) for name in _module.__all__]


@pytest.mark.parametrize(
    "obj", [o for o in PUBLIC if inspect.isclass(o) or inspect.isfunction(o)],
    ids=lambda o: o.__qualname__,
)  # fmt: skip
def test_public_docstrings_have_shapes_and_an_example_that_runs(obj):
    docstring = inspect.getdoc(obj) or ""
    assert ">>>" in docstring, f"{obj.__qualname__} has no example"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(obj, obj.__qualname__, globs={}):
        runner.run(test)
    assert runner.failures == 0, f"{obj.__qualname__}: {runner.failures} failing examples"


def test_docstrings_cross_reference_in_the_syntax_the_site_renders():
    """mkdocstrings shows a Sphinx role (``:class:`X```) as raw text: references are
    autorefs links (``[`X`][]`` or ``[`X`][full.path]``), which the strict build checks."""
    role = re.compile(r":(class|func|meth|data|attr|mod|exc|obj):`")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if role.search(line)
    ]
    assert not found, found


def test_every_public_name_has_an_api_page_entry():
    """Each class and function of ``gblr.__all__`` is rendered on the API page (modules
    such as ``gblr.deploy`` are documented through their members)."""
    entries = set(re.findall(r"^::: (\S+)", (ROOT / "docs" / "api.md").read_text(), re.M))
    missing = [
        name
        for name in gblr.__all__
        if not name.startswith("__")
        and not inspect.ismodule(getattr(gblr, name))
        and f"gblr.{name}" not in entries
    ]
    assert not missing, missing


def test_the_design_s_table_of_public_names_lists_every_name():
    """docs/design.md says its table is "everything in gblr.__all__"; eight names were
    missing from it."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    table = text.split("### The public names", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", table))
    missing = [name for name in gblr.__all__ if name not in listed]
    assert missing == []
