"""The whole tree passes the linter and is formatted as pyproject.toml's `[tool.ruff]` says (`ruff check .`,
`ruff format .` fix what they report)."""

import sys
from pathlib import Path

import pytest

from conftest import run_subprocess


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["check", "--no-cache"], ["format", "--check", "--no-cache"]])
def test_the_tree_is_linted_and_formatted(command):
    done = run_subprocess([sys.executable, "-m", "ruff", *command, str(REPO_ROOT)], timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_the_linter_sees_what_it_is_configured_to_see(tmp_path):
    """A file with an unused import, an unsorted import block and a line past 120 columns of code is refused."""
    source = tmp_path / "bad.py"
    source.write_text("import sys\nimport os\n\nvalue = [" + ", ".join(["1"] * 60) + "]\n")
    config = ["--config", str(REPO_ROOT / "pyproject.toml")]
    checked = run_subprocess([sys.executable, "-m", "ruff", "check", "--no-cache", *config, str(source)], timeout=60)
    assert checked.returncode == 1 and "F401" in checked.stdout and "I001" in checked.stdout
    formatted = run_subprocess(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *config, str(source)], timeout=60
    )
    assert formatted.returncode == 1 and "bad.py" in formatted.stdout
