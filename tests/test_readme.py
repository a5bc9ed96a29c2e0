"""The README's and docs/'s examples run, their links resolve, and the README's two top commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "RESULTS.md"]
EXAMPLE_PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def _blocks(lang: str, page: Path = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)


def test_python_examples_run():
    """The README's examples (in memory, without Ray)."""
    blocks = _blocks("python")
    assert blocks, "the README has Python examples"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README


# The examples moved out of the README into docs/ run the same way, so none loses its test.
@pytest.mark.parametrize("page", [p for p in EXAMPLE_PAGES[1:] if _blocks("python", p)], ids=_name)
def test_docs_python_examples_run(page, ray_local):  # configuration.md's ShardedKMeans starts Ray
    for code in _blocks("python", page):
        exec(compile(code, _name(page), "exec"), {})  # noqa: S102 - our own docs


def test_top_commands_match_ci():
    setup, tests = _blocks("bash")[:2]
    ci = (REPO / ".ci" / "run").read_text()
    # CI installs exactly as the first command does, and runs the second command's test runner.
    for step in re.findall(r"pip install [^&\n]+", setup):
        assert step.strip() in ci, f"CI does not run `{step.strip()}`"
    assert setup.strip().endswith("dce run")
    assert "python -m pytest" in tests and "python -m pytest" in ci


def test_readme_is_short():
    # A README for users; reference material lives in docs/, measurements in benchmarks/RESULTS.md.
    assert len(README.read_bytes()) <= 12 * 1024


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_name)
def test_documented_commands_exist(page):
    help_text = CliRunner().invoke(app, ["--help"]).output
    for command in re.findall(r"^\| `dce (\w[\w-]*)", page.read_text(), flags=re.M):
        assert command in help_text, f"{_name(page)} documents `dce {command}`, which does not exist"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_resolve_inside_the_repository(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_relative_to(REPO), f"{_name(page)} links outside the repository: {target}"
        assert linked.exists(), f"{_name(page)} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(linked), f"{_name(page)} links to {target}: no such heading"


def test_the_configuration_reference_is_generated_from_the_config():
    """docs/configuration.md's settings tables are scripts/config_docs.py's output for engine/config.py as it is."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/config_docs.py", "--check"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
