"""The embedded runtime: each workspace is a process group on its own loopback address with its own home.

WARM means the process group is stopped and the home kept; COLD means the home lives only in a verified,
compressed archive. Everything a crash could leave half-done is recovered from the files at start
(see ``archive``), and workspace processes die with the gateway (parent-death signal plus the process-group
record), so nothing is left running behind it. A process that leaves the group (``setsid``, a daemonising server,
tmux) is found by the mark every workspace process inherits in its environment (``MARK``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.accesslog import log_text
from gateway.config import Local, LocalWorkspace
from gateway.errors import NotFound
from gateway.lifecycle.archive import ArchiveError, archive_home, recover, restore_home
from gateway.lifecycle.base import Event, LifecycleError, Phase, Runtime, WorkspaceSpec, WorkspaceState
from gateway.lifecycle.code_server import seed_settings, settings_file
from gateway.lifecycle.devcontainer import LabelFile

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_OWN_FOLDERS = frozenset({"XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"})
"""Where programs keep a person's files; the gateway's would make every workspace (code-server's data folder, its
config.yaml) share the gateway user's, so a workspace gets its HOME's defaults unless its ``env`` names one."""


def dies_with(parent: int) -> Callable[[], None]:
    """For ``preexec_fn``, run in the child between fork and exec: it asks the kernel for SIGTERM when ``parent``
    dies, and exits at once if that happened already, between the fork and the ask (the kernel would never send
    it then, and a workspace started by a gateway killed there ran on untracked, in a home later archived)."""

    def ask() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return ask


MARK = "CODEHUB_RUN"
"""Set to a value new at each start in a workspace's environment, which every process it starts inherits: when the
workspace stops, every process of the gateway's user whose ``/proc/PID/environ`` carries it is signalled, in its
process group or not. A process that clears or rewrites its own environment is not found this way."""


def signal_marked(marks: Collection[str], sig: signal.Signals) -> None:
    """Send ``sig`` to every process of this user started with one of ``marks`` as its ``MARK``.

    Each process is held by a pidfd before its environment is read, so a pid reused meanwhile is never signalled:
    the signal goes to the process that was read, or to none."""
    wanted = [f"\0{MARK}={mark}\0".encode() for mark in marks]
    if not wanted:
        return
    uid = os.getuid()
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                pidfd = os.pidfd_open(int(entry.name))
            except OSError:  # gone already, or not ours to see
                continue
            try:
                environ = b"\0" + Path(entry.path, "environ").read_bytes()
                if any(mark in environ for mark in wanted):
                    signal.pidfd_send_signal(pidfd, sig)
            except OSError:
                pass
            finally:
                os.close(pidfd)


def _process_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class _Slot:
    """Per-workspace bookkeeping: the one lock that serialises its transitions, and the process if any."""

    spec: WorkspaceSpec
    config: LocalWorkspace
    address: str
    root: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    process: asyncio.subprocess.Process | None = None
    in_flight: Phase | None = None
    failure: str = ""
    archive_failure: str = ""
    """Why the last archive failed (a full disk, say), shown while the workspace stays WARM."""
    state: WorkspaceState | None = None
    labels: LabelFile | None = None
    mark: str = ""
    """The ``MARK`` of the running process's start."""
    foreign: str = ""
    """Why its files are not its owner's to use (see ``_claim``), shown while it refuses to start."""
    since: float = 0.0
    """When its owner's workspace of this name began (``WorkspaceSpec.since``)."""

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def archive(self) -> Path:
        return self.root.parent.parent / "archives" / f"{self.spec.id}.tar.gz"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.json"

    @property
    def owner_file(self) -> Path:
        return self.root / "owner"


def _write_json(path: Path, data: dict[str, object]) -> None:
    """Whole or not at all: a file cut short by a crash would read as someone else's (``owner``) or as none."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def configured_spec(name: str, ws: LocalWorkspace) -> WorkspaceSpec:
    """A workspace as the configuration declares it, before any change made through the API."""
    return WorkspaceSpec(id=name, owner=ws.owner, collaborators=ws.collaborators, ide_port=ws.ide_port,
                         ports=dict(ws.ports), https_ports=frozenset(ws.https_ports))


class LocalRuntime(Runtime):
    def __init__(self, local: Local, *, stop_timeout: float = 10.0,
                 proxy_uri: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._state_dir = local.state_dir.resolve()
        self._stop_timeout = stop_timeout
        self._proxy_uri = proxy_uri
        self._slots: dict[str, _Slot] = {}
        for name, address in local.addresses().items():
            ws = local.workspaces[name]
            self._slots[name] = _Slot(configured_spec(name, ws), ws, address, self._state_dir / "workspaces" / name)

    def _slot(self, workspace: str) -> _Slot:
        slot = self._slots.get(workspace)
        if slot is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        return slot

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare)
        for slot in self._slots.values():
            self._observe(slot)

    def _prepare(self) -> None:
        """Every workspace's files, in one worker thread: a thread hop per workspace made ten thousand of them
        take 40 s to start. Processes a dead gateway left are ended in one pass over /proc for all of them."""
        marks = []
        for slot in self._slots.values():
            try:
                slot.root.mkdir(parents=True)
                fresh = True
            except FileExistsError:
                fresh = False
            slot.archive.parent.mkdir(parents=True, exist_ok=True)
            marks.append(self._kill_leftover(slot))
            recover(slot.home, slot.archive)
            slot.foreign = slot.failure = self._claim(slot, fresh)
            if not slot.foreign:
                slot.spec = self._with_settings(slot)
        signal_marked([mark for mark in marks if mark], signal.SIGKILL)

    @staticmethod
    def _claim(slot: _Slot, fresh: bool) -> str:
        """Its folder is recorded as its owner's, with when it began; one recorded as someone else's (the operator
        gave the name of a removed workspace to another person) is not used: it holds the old owner's home,
        archive, collaborators and port rules. The operator moves it away, and the name starts afresh, with none
        of the old one's share links (``WorkspaceSpec.since``). An empty answer: all is well."""
        try:
            record = json.loads(slot.owner_file.read_text())
            recorded, since = str(record["owner"]), float(record["since"])
        except FileNotFoundError:  # new, or from before owners were recorded: the configuration says whose (and
            since = time.time() if fresh else 0.0  # the links of a folder from before are its own)
            _write_json(slot.owner_file, {"owner": slot.spec.owner, "since": since})
            recorded = slot.spec.owner
        except (OSError, ValueError, KeyError, TypeError) as exc:
            recorded, since = f"(unreadable: {exc})", 0.0
        if recorded == slot.spec.owner:
            slot.since = since
            return ""
        log.error("workspace %s is %s's now, but %s and %s are those of %s's workspace of that name: it does not "
                  "start until they are moved away", slot.spec.id, log_text(slot.spec.owner), slot.root,
                  slot.archive, log_text(recorded))
        return ("This workspace's files are those of an earlier workspace of the same name, of someone else: it "
                "does not start until the operator moves them away (the gateway's log says where).")

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(name) for name, slot in self._slots.items() if slot.process))

    def get(self, workspace: str) -> WorkspaceState | None:
        slot = self._slots.get(workspace)
        return None if slot is None else slot.state

    def list(self) -> list[WorkspaceState]:
        return [slot.state for slot in self._slots.values() if slot.state is not None]

    async def status(self, workspace: str) -> WorkspaceState:
        return self._observe(self._slot(workspace))

    async def wake(self, workspace: str) -> WorkspaceState:
        slot = self._slot(workspace)
        async with slot.lock, self._settled(slot):
            if slot.foreign:
                return self._fail(slot, slot.foreign)
            state = self._observe(slot)
            if state.phase is Phase.RUNNING:
                return state
            if state.phase is Phase.COLD:
                self._begin(slot, Phase.RESTORING, "restoring the home directory from its archive")
                try:
                    await asyncio.to_thread(restore_home, slot.archive, slot.home)
                except ArchiveError as exc:
                    return self._fail(slot, str(exc))
            self._begin(slot, Phase.STARTING, "starting the workspace")
            try:
                await self._spawn(slot)
            except (OSError, ValueError) as exc:
                return self._fail(slot, f"the workspace command could not start: {exc}")
            return self._end(slot)

    async def stop(self, workspace: str) -> WorkspaceState:
        slot = self._slot(workspace)
        async with slot.lock, self._settled(slot):
            if slot.process is None and not slot.failure:
                return self._observe(slot)
            if slot.process is not None:
                self._begin(slot, Phase.STOPPING, "stopping the workspace")
                await self._terminate(slot)
            slot.failure = slot.foreign
            return self._end(slot)

    async def archive(self, workspace: str) -> WorkspaceState:
        await self.stop(workspace)
        slot = self._slot(workspace)
        async with slot.lock, self._settled(slot):
            if self._observe(slot).phase is not Phase.WARM or not slot.home.exists():
                return self._observe(slot)
            self._begin(slot, Phase.ARCHIVING, "archiving the home directory")
            try:
                await asyncio.to_thread(archive_home, slot.home, slot.archive)
            except ArchiveError as exc:
                log.error("archive of %s failed, its home is kept and it stays WARM: %s", workspace,
                          log_text(str(exc)))  # it names files of the home, which its owner chose
                slot.archive_failure = f"The last archive failed, the home is kept: {exc}"
                self._end(slot)  # WARM again, since now: the reaper tries again after another idle.to_cold
                raise LifecycleError(f"Archiving {workspace} failed, its home is kept: {exc}") from exc
            slot.archive_failure = ""
            return self._end(slot)

    async def update(self, workspace: str, *, ports: Mapping[int, str] | None = None,
                     collaborators: tuple[str, ...] | None = None,
                     identity_ports: frozenset[int] | None = None,
                     https_ports: frozenset[int] | None = None,
                     labels: Mapping[int, str] | None = None) -> WorkspaceState:
        slot = self._slot(workspace)
        if slot.foreign:
            raise LifecycleError(slot.foreign)
        settings = self._read_settings(slot)
        if ports is not None:
            settings["ports"] = {str(port): visibility for port, visibility in ports.items()}
        if collaborators is not None:
            settings["collaborators"] = list(collaborators)
        if identity_ports is not None:
            settings["identity_ports"] = sorted(identity_ports)
        if https_ports is not None:
            settings["https_ports"] = sorted(https_ports)
        if labels is not None:
            settings["labels"] = {str(port): label for port, label in labels.items()}
        _write_json(slot.settings_file, settings)
        slot.spec = self._with_settings(slot)
        return self._observe(slot)

    def listening_ports(self, workspace: str) -> set[int] | None:
        slot = self._slots.get(workspace)
        if slot is None or slot.process is None:
            return set()
        return listening_ports(slot.address)

    def port_labels(self, workspace: str) -> dict[int, str]:
        slot = self._slots.get(workspace)
        if slot is None or slot.foreign:
            return {}
        if slot.labels is None:
            slot.labels = LabelFile(slot.home)
        return slot.labels.labels()

    def _read_settings(self, slot: _Slot) -> dict[str, object]:
        try:
            data = json.loads(slot.settings_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _with_settings(self, slot: _Slot) -> WorkspaceSpec:
        settings = self._read_settings(slot)
        spec = replace(configured_spec(slot.spec.id, slot.config), since=slot.since)
        ports = settings.get("ports")
        if isinstance(ports, dict):
            spec = replace(spec, ports={**spec.ports, **{int(port): str(v) for port, v in ports.items()}})
        collaborators = settings.get("collaborators")
        if isinstance(collaborators, list):
            spec = replace(spec, collaborators=tuple(str(name) for name in collaborators))
        identity_ports = settings.get("identity_ports")
        if isinstance(identity_ports, list):
            spec = replace(spec, identity_ports=frozenset(int(port) for port in identity_ports))
        https_ports = settings.get("https_ports")
        if isinstance(https_ports, list):
            spec = replace(spec, https_ports=frozenset(int(port) for port in https_ports))
        labels = settings.get("labels")
        if isinstance(labels, dict):
            spec = replace(spec, labels={int(port): str(label) for port, label in labels.items()})
        return spec

    def _observe(self, slot: _Slot) -> WorkspaceState:
        """Derive the phase from the process and the files; an in-flight operation names the transition."""
        if slot.in_flight is not None:
            phase = slot.in_flight
        elif slot.process is not None and slot.process.returncode is None:
            phase = Phase.RUNNING
        elif slot.home.exists() or not slot.archive.exists():
            phase = Phase.FAILED if slot.failure else Phase.WARM
        else:
            phase = Phase.COLD
        # a failed restore leaves the workspace COLD (its archive is all there is), with the reason attached;
        # a failed archive leaves it WARM, with that reason
        message = (slot.failure if phase in (Phase.FAILED, Phase.COLD)
                   else slot.archive_failure if phase is Phase.WARM else "")
        previous = slot.state
        if (previous is None or previous.phase is not phase or previous.spec is not slot.spec
                or previous.message != message):
            since = previous.since if previous is not None and previous.phase is phase else time.time()
            slot.state = WorkspaceState(slot.spec, phase, slot.address if phase is Phase.RUNNING else None,
                                        message, since)
        assert slot.state is not None
        return slot.state

    def _begin(self, slot: _Slot, phase: Phase, message: str) -> None:
        slot.in_flight = phase
        self._observe(slot)
        self.hub.publish(Event(slot.spec.id, phase, message))

    def _end(self, slot: _Slot) -> WorkspaceState:
        slot.in_flight = None
        state = self._observe(slot)
        self.hub.publish(Event(slot.spec.id, state.phase, state.message))
        return state

    @contextlib.asynccontextmanager
    async def _settled(self, slot: _Slot) -> AsyncIterator[None]:
        """An operation broken off by an error of a kind nobody foresaw (a bug) leaves no phase in flight: the
        workspace would read RESTORING or STARTING for good, and every later wake would wait on a phase that
        nothing ends. It fails instead, naming the error, and its phase is read from what is there again."""
        try:
            yield
        except Exception as exc:
            if slot.in_flight is not None:
                self._fail(slot, f"{slot.in_flight.value.lower()} broke off on an unexpected error "
                                 f"({type(exc).__name__}); see the gateway's log", traceback=True)
            raise

    def _fail(self, slot: _Slot, message: str, *, traceback: bool = False) -> WorkspaceState:
        log.error("workspace %s failed: %s", slot.spec.id, message, exc_info=traceback)
        slot.failure = message
        return self._end(slot)

    def _command(self, slot: _Slot) -> tuple[str, ...]:
        values = {"host": slot.address, "home": str(slot.home), "ide_port": slot.spec.ide_port,
                  "workspace": slot.spec.id}
        return tuple(part.format(**values) for part in slot.config.command)

    async def _spawn(self, slot: _Slot) -> None:
        slot.home.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("CODEHUB_") and key not in _OWN_FOLDERS}
        if self._proxy_uri is not None:
            env["VSCODE_PROXY_URI"] = self._proxy_uri(slot.spec.id)
        env.update(slot.config.env)
        mark = secrets.token_hex(16)
        env.update(HOME=str(slot.home), HOST=slot.address, CODEHUB_WORKSPACE=slot.spec.id, **{MARK: mark})
        command = self._command(slot)
        ide_settings = settings_file(command, slot.home, env)
        if ide_settings is not None:
            await asyncio.to_thread(seed_settings, ide_settings)  # file I/O: off the loop that serves requests
        output = (slot.root / "output.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=slot.home, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=output,
                stderr=output, start_new_session=True, preexec_fn=dies_with(os.getpid()),
            )
        finally:
            output.close()
        slot.process, slot.failure, slot.archive_failure, slot.mark = process, "", "", mark
        slot.run_file.write_text(json.dumps({"pgid": process.pid, "start": _process_start_time(process.pid),
                                             "mark": mark}))
        asyncio.get_running_loop().create_task(self._watch_exit(slot, process))

    async def _watch_exit(self, slot: _Slot, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if slot.process is not process or slot.in_flight is Phase.STOPPING:
            return
        _kill_group(process.pid, signal.SIGKILL)
        await asyncio.to_thread(signal_marked, [slot.mark], signal.SIGKILL)
        if slot.process is not process:  # meanwhile stopped, or woken again (a wake found it gone): not ours now
            return
        slot.process = None
        slot.run_file.unlink(missing_ok=True)
        slot.failure = f"the workspace process exited with code {code}" + _last_line(slot.root / "output.log")
        self._end(slot)

    async def _terminate(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        _kill_group(process.pid, signal.SIGTERM)
        await asyncio.to_thread(signal_marked, [slot.mark], signal.SIGTERM)  # /proc is read off the loop
        try:
            await asyncio.wait_for(process.wait(), self._stop_timeout)
        except TimeoutError:
            log.warning("workspace %s ignored SIGTERM for %.0fs; killing it", slot.spec.id, self._stop_timeout)
        _kill_group(process.pid, signal.SIGKILL)
        await asyncio.to_thread(signal_marked, [slot.mark], signal.SIGKILL)
        await process.wait()
        slot.process = None
        slot.run_file.unlink(missing_ok=True)

    def _kill_leftover(self, slot: _Slot) -> str:
        """A gateway that died hard may have left a process group; kill it only if the pid is still ours. The
        ``MARK`` of that start, for the caller to end the processes that left the group."""
        try:
            record = json.loads(slot.run_file.read_text())
        except (OSError, ValueError):
            return ""
        mark = record.get("mark") if isinstance(record, dict) else None
        mark = mark if isinstance(mark, str) else ""
        pgid = record.get("pgid") if isinstance(record, dict) else None
        if not isinstance(pgid, int):
            slot.run_file.unlink(missing_ok=True)
            return mark
        leader_start = _process_start_time(pgid)
        # The leader may have exited (it gets SIGTERM when the gateway dies) while its children live on in
        # the group; Linux never hands out a pid still in use as a process group id, so a group with a
        # missing leader is still ours. A live leader must be the very process we started.
        if leader_start is None or leader_start == record.get("start"):
            log.warning("killing workspace %s left running by a previous gateway (pgid %d)", slot.spec.id, pgid)
            _kill_group(pgid, signal.SIGKILL)
        slot.run_file.unlink(missing_ok=True)
        return mark


def _last_line(log_file: Path) -> str:
    try:
        with log_file.open("rb") as handle:
            handle.seek(max(0, log_file.stat().st_size - 512))
            lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return f": {lines[-1][:200]}" if lines else ""


def listening_ports(address: str) -> set[int]:
    """TCP ports in LISTEN state on exactly ``address``, read from /proc/net/tcp."""
    wanted = socket.inet_aton(address)[::-1].hex().upper()
    ports: set[int] = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return ports
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        host, _, port = local.partition(":")
        if state == "0A" and host == wanted:
            ports.add(int(port, 16))
    return ports
