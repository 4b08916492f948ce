"""Archive scenarios run by a user other than root: ``python -m tests.lifecycle.unprivileged_home SCENARIO FOLDER``.

Root may delete entries of a folder it may not write; the gateway's own user may not. Homes hold such folders as a
matter of course (Go's module cache makes its folders 0555 and its files 0444), so the scenarios that delete a home,
or what a crash left of one, run here as the test's unprivileged user. Each exits 0 when the home came back
exactly and nothing was left behind, and says what differed otherwise.
"""

from __future__ import annotations

import argparse
import gzip  # noqa: F401  (imported before the user changes: the interpreter's folder may be root's alone)
import os
import sys
import tarfile
from pathlib import Path

from gateway.lifecycle.archive import archive_home, recover, restore_home, verify_archive
from tests.lifecycle.conftest import fill_home, snapshot


def read_only_home(home: Path) -> None:
    """A home with Go's module cache in it (folders 0555, files 0444), a folder 0500, and itself 0555."""
    fill_home(home, big=64 << 10, small_files=5)
    module = home / "go" / "pkg" / "mod" / "example.com" / "lib@v1.2.3"
    (module / "internal").mkdir(parents=True)
    (module / "go.mod").write_text("module example.com/lib\n")
    (module / "internal" / "lib.go").write_text("package internal\n")
    (module / "internal" / "empty").mkdir()
    for path in sorted(module.parent.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    module.parent.chmod(0o555)
    sealed = home / "sealed"
    sealed.mkdir()
    (sealed / "note").write_text("kept")
    (sealed / "linked-out").symlink_to(outside_of(home))  # deleting makes folders writable, never what links reach
    sealed.chmod(0o500)
    home.chmod(0o555)  # the home itself too


def outside_of(home: Path) -> Path:
    """A read-only folder beside the home (its user's, so a chmod through a link would succeed)."""
    return home.parent.parent.parent / "outside"


def _written(home: Path, archive: Path) -> None:
    """The archive as ``archive_home`` writes it, before it deletes the home (a crash may stop it there)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(home, arcname=".")
    verify_archive(archive)


def main(scenario: str, folder: Path) -> int:
    home, archive = folder / "workspaces" / "ws" / "home", folder / "archives" / "ws.tar.gz"
    archive.parent.mkdir(parents=True)
    outside_of(home).mkdir(mode=0o555)
    read_only_home(home)
    before = snapshot(home)
    if scenario == "archive":
        archive_home(home, archive)
    elif scenario == "recover-removing":  # archived and verified, the home renamed to be deleted: a crash there
        _written(home, archive)
        home.rename(home.with_name("home.removing"))
        recover(home, archive)
    elif scenario == "restore-over-leftover":  # a restore cut short left a copy with its folders' modes set
        _written(home, archive)
        home.rename(home.with_name("home.restoring"))
        restore_home(archive, home)
    else:
        raise SystemExit(f"no scenario {scenario}")
    if archive.exists():
        if home.exists():
            print("both the home and its archive are there", file=sys.stderr)
            return 1
        restore_home(archive, home)
    left = sorted(path.name for path in home.parent.iterdir() if path != home)
    if left or archive.exists():
        print(f"left behind: {left}, archive: {archive.exists()}", file=sys.stderr)
        return 1
    if (mode := outside_of(home).stat().st_mode & 0o7777) != 0o555:
        print(f"a folder outside the home, behind a link, was made {oct(mode)}", file=sys.stderr)
        return 1
    after = snapshot(home)
    if after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))
        print(f"the home came back different: {changed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["archive", "recover-removing", "restore-over-leftover"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--as-user", type=int, help="run as this user and group (from root)")
    args = parser.parse_args()
    if args.as_user is not None:  # here rather than by subprocess: its exec would need to read root's interpreter
        os.setgroups([])
        os.setgid(args.as_user)
        os.setuid(args.as_user)
    os.umask(0o022)
    sys.exit(main(args.scenario, args.folder))
