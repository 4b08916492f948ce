"""The code base stays lint-clean and type-checked (mypy --strict on the package, its tests and benchmarks), as the
style guide asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = _run("mypy", "gateway", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_layout_contract_holds() -> None:
    """shared/DESIGN.md "Layout", as import-linter contracts in pyproject.toml: edge/ is pure (no aiohttp), proxy/
    takes numbers (no Config), and auth/, lifecycle/ and proxy/ never reach for server/, web/ or aiohttp's server
    API."""
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout, result.stdout
