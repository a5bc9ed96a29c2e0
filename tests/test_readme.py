"""The README's examples run, and its two top commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from engine.cli import app

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    blocks = _blocks("python")
    assert blocks, "the README has Python examples"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README


def test_top_commands_match_ci():
    setup, tests = _blocks("bash")[:2]
    ci = (REPO / ".ci" / "run").read_text()
    # CI installs exactly as the first command does, and runs the second command's test runner.
    for step in re.findall(r"pip install [^&\n]+", setup):
        assert step.strip() in ci, f"CI does not run `{step.strip()}`"
    assert setup.strip().endswith("dce run")
    assert "python -m pytest" in tests and "python -m pytest" in ci


def test_documented_commands_exist():
    help_text = CliRunner().invoke(app, ["--help"]).output
    for command in re.findall(r"^\| `dce (\w[\w-]*)", README, flags=re.M):
        assert command in help_text, f"README documents `dce {command}`, which does not exist"
