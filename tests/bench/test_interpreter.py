"""The interpreter the benchmark's gateways run on: chosen, else the optimised build ``.ci/install`` prepared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import servers
from bench.instructions import start_gateway
from bench.procs import Procs
from bench.servers import ROOT, gateway_python


def test_a_chosen_interpreter_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEHUB_BENCH_PYTHON", "/opt/python-pgo/bin/python3")
    assert gateway_python() == "/opt/python-pgo/bin/python3"


def test_the_bench_venv_is_taken_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not resolved to the interpreter it links to: that one would not find the venv's packages."""
    monkeypatch.delenv("CODEHUB_BENCH_PYTHON", raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setattr(servers, "DEBIAN_VENV", tmp_path)
    assert gateway_python() == str(tmp_path / "bin" / "python")


def test_without_one_the_gateway_runs_on_this_interpreter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CODEHUB_BENCH_PYTHON", raising=False)
    monkeypatch.setattr(servers, "DEBIAN_VENV", tmp_path / "missing")
    assert gateway_python() == sys.executable


def test_the_installed_bench_interpreter_runs_this_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """``.ci/install`` made it: the gateway, its loop and its parsers import there, from this checkout (``-I``: not
    from the working folder)."""
    monkeypatch.delenv("CODEHUB_BENCH_PYTHON", raising=False)
    python = gateway_python()
    assert Path(python).parent.parent == servers.DEBIAN_VENV, "run .ci/install: it makes .venv-debian"
    shown = subprocess.run([python, "-I", "-c", "import gateway, uvloop, httptools; print(gateway.__file__)"],
                           capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert Path(shown).is_relative_to(ROOT)


def test_bench_instructions_runs_the_gateway_of_the_tree_it_is_given(tmp_path: Path) -> None:
    """``--tree`` compares two checkouts: started from the benchmark's own folder, ``-m gateway`` would import the
    gateway found there first, whatever ``PYTHONPATH`` says, and both sides would measure the same code."""
    tree = tmp_path / "other-checkout"
    (tree / "gateway").mkdir(parents=True)
    (tree / "gateway" / "__init__.py").write_text("")
    marker = tmp_path / "ran"
    (tree / "gateway" / "__main__.py").write_text(
        f"import pathlib, gateway\npathlib.Path({str(marker)!r}).write_text(gateway.__file__)\n")
    procs = Procs(logs=tmp_path)
    try:
        proc = start_gateway(procs, tree, [sys.executable, "-m", "gateway"])
        proc.popen.wait(30)
    finally:
        procs.stop_all()
    assert marker.read_text() == str(tree / "gateway" / "__init__.py")
