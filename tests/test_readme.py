"""The README's example runs, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 384)
    assert namespace["exact"].flops() == 3 * 4 * 5
    assert namespace["learner"].summary()["macs_ratio"] <= 0.3


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(commands) == 2, "README must hold exactly two set-up commands"
    test_command = commands[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_ci_also_runs_the_slow_tests_the_readme_command_leaves_out():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "-m 'not slow'" in pyproject  # the README's command: the fast suite
    assert "python -m pytest -q -m slow" in (ROOT / ".ci" / "run").read_text()
