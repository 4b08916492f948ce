"""Homes with folders their user may not write in (Go's module cache: folders 0555, files 0444) archive, recover
and restore like any other.

Only root may delete in such a folder without first making it writable, so the scenarios
(``unprivileged_home.py``) run as an unprivileged user when the tests run as root: as the gateway's user, deleting
the home after a verified archive used to fail half-way, leaving ``home.removing`` (which a restart could not
delete either) and a workspace stuck ARCHIVING.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A folder the scenario's user owns: pytest's own tmp_path is root's alone (0700) when root runs the tests."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    made = Path(tempfile.mkdtemp(prefix="codehub-read-only-"))
    try:
        os.chown(made, NOBODY, NOBODY)
        yield made
    finally:
        shutil.rmtree(made)


@pytest.mark.parametrize("scenario", ["archive", "recover-removing", "restore-over-leftover"])
def test_read_only_folders_in_a_home(folder: Path, scenario: str) -> None:
    user = ["--as-user", str(NOBODY)] if os.geteuid() == 0 else []
    done = subprocess.run(
        [sys.executable, "-m", "tests.lifecycle.unprivileged_home", scenario, str(folder), *user],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr
