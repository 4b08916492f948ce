"""The IDE's defence in depth: a workspace pod's real code-server admits only requests carrying the workspace's
secret, which only the gateway can compute and which it adds (replacing the client's) to the IDE requests it
proxies. code-server runs exactly as the pod the runtime creates says: its args and its environment."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway.auth.ide import IDE_COOKIE, ide_secret, load_key, put_ide_cookie, secret_for
from gateway.auth.identity import Identity
from gateway.config import Config, ConfigError, Kubernetes
from gateway.lifecycle import WorkspaceSpec
from gateway.lifecycle.kubernetes.objects import HOME, WorkspaceResource, make_pod
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.conftest import next_address
from tests.kube.emulator import POD, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, kube_settings

pytestmark = pytest.mark.timeout(120)

CODE_SERVER = Path(os.environ.get("CODEHUB_PEERS", "/opt/codehub-peers")) / "bin" / "code-server"
KEY = base64.b64encode(bytes(range(48)))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "ide-key"
    path.write_bytes(KEY + b"\n")
    return path


def test_the_pod_requires_the_secret_only_when_there_is_one() -> None:
    ws, settings = WorkspaceResource(id="w1", owner="alice"), Kubernetes()
    (locked,) = make_pod(ws, settings, "s3cret")["spec"]["containers"]
    assert locked["args"][:2] == ["--auth", "password"]
    assert {"name": "HASHED_PASSWORD", "value": "s3cret"} in locked["env"]
    (open_,) = make_pod(ws, settings)["spec"]["containers"]
    assert open_["args"][:2] == ["--auth", "none"]
    assert all(item["name"] != "HASHED_PASSWORD" for item in open_["env"])


def test_secrets_differ_per_workspace_and_key() -> None:
    secrets = {ide_secret(key, workspace, uid) for key in (KEY, KEY[::-1]) for workspace in ("w1", "w2")
               for uid in ("uid-1", "uid-2")}
    assert len(secrets) == 8
    assert all("$argon" not in secret for secret in secrets)  # code-server's plain compare, not argon2


@pytest.mark.parametrize(("sent", "secret", "expected"), [
    (None, "s", f"{IDE_COOKIE}=s"),
    (f"a=1; {IDE_COOKIE}=forged; b=2", "s", f"a=1; b=2; {IDE_COOKIE}=s"),
    (f"{IDE_COOKIE}-suffix=forged;{IDE_COOKIE}=x", "s", f"{IDE_COOKIE}=s"),
    (f"a=1; {IDE_COOKIE}=forged", None, "a=1"),
    (f"{IDE_COOKIE}=forged", None, None),
])
def test_the_client_never_chooses_the_ide_cookie(sent: str | None, secret: str | None, expected: str | None) -> None:
    headers: CIMultiDict[str] = CIMultiDict({"Cookie": sent} if sent is not None else {})
    put_ide_cookie(headers, secret)
    assert headers.get("Cookie") == expected


@pytest.mark.parametrize(("content", "complaint"), [(None, "cannot read"), (b"short", "fewer than 32")])
def test_a_missing_or_weak_key_stops_start_up(tmp_path: Path, content: bytes | None, complaint: str) -> None:
    path = tmp_path / f"key-{complaint.split()[0]}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=complaint):
        load_key(path)


@contextlib.asynccontextmanager
async def pod_container(pod: dict[str, Any], address: str, home: Path) -> AsyncIterator[str]:
    """Run the pod's container as a kubelet would, on the pod's loopback address; yield its base URL."""
    (container,) = pod["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    args = [arg.replace("0.0.0.0", address) if arg.startswith("0.0.0.0:") else arg for arg in container["args"]]
    args = [str(home) if arg == HOME else arg for arg in args]
    env = {"PATH": os.environ["PATH"], **{item["name"]: item["value"] for item in container["env"]},
           "HOME": str(home)}
    process = await asyncio.create_subprocess_exec(
        str(CODE_SERVER), *args, "--user-data-dir", str(home / ".cs"), env=env, start_new_session=True,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://{address}:{port}"
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                assert process.returncode is None, "code-server exited"
                await asyncio.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def direct(base: str, path: str, cookie: str | None) -> tuple[int, str]:
    """A request that bypasses the gateway, as another pod could make where NetworkPolicy is not enforced."""
    headers = {"Cookie": f"{IDE_COOKIE}={cookie}"} if cookie is not None else {}
    async with aiohttp.ClientSession() as session, session.get(
            f"{base}{path}", headers=headers, allow_redirects=False) as response:
        return response.status, response.headers.get("Location", "")


async def test_real_code_server_admits_the_gateway_and_nobody_else(
        kube: KubeEnv, key_file: Path, aiohttp_client: Any, tmp_path: Path) -> None:
    if not CODE_SERVER.exists():
        pytest.fail(f"{CODE_SERVER} is missing: run .ci/install-code-server.sh")
    address = next_address()
    home = tmp_path / "home"
    home.mkdir()
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "w1"}, "spec": {"owner": "alice"}}, NS)
    settings = kube_settings(kube.url, ide_key_file=str(key_file)).model_dump(mode="json")
    config = Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                    "local": {"state_dir": str(tmp_path / "state")}})
    async with FakeKubelet(kube.emulator, pod_ip=lambda pod: address):
        client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(config))
        await client.app[GATEWAY].runtime.wake("w1")
        pod = kube.emulator.get_object(POD, NS, "ws-w1")
        assert pod is not None
        async with pod_container(pod, address, home) as base:
            folder = f"/?folder={home}"
            uid = kube.emulator.get_object(WORKSPACE, NS, "w1")["metadata"]["uid"]  # type: ignore[index]
            secret = ide_secret(KEY, "w1", uid)
            # Directly: code-server's login page for no cookie, a forged one, another workspace's secret.
            for cookie in (None, "forged", ide_secret(KEY, "w2", uid), ide_secret(KEY, "w1", "")):
                status, location = await direct(base, folder, cookie)
                assert (status, location.split("?")[0]) == (302, "./login"), cookie
            assert (await direct(base, folder, secret))[0] == 200  # the value the gateway computes opens it
            assert (await direct(base, "/healthz", None))[0] == 200  # the pod's readiness probe needs none
            # Through the gateway, for the owner: the workbench, whatever session cookie the client sends.
            session = client.app[GATEWAY].auth.sessions.issue(Identity("alice"), "ide-w1.localhost:8080")
            for forged in ("", f"; {IDE_COOKIE}=forged"):
                response = await client.get(folder, allow_redirects=False, headers={
                    "Host": "ide-w1.localhost:8080", "Accept": "text/html",
                    "Cookie": f"codehub_session={session}{forged}"})
                assert response.status == 200, (response.status, response.headers.get("Location"))
                assert "vscode" in (await response.text()).lower()


def test_a_key_of_exactly_the_minimum_length_is_enough(tmp_path: Path) -> None:
    enough, short = tmp_path / "key-32", tmp_path / "key-31"
    enough.write_bytes(KEY[:32] + b"\n")
    short.write_bytes(KEY[:31] + b"\n")
    assert load_key(enough) == KEY[:32]
    with pytest.raises(ConfigError, match="holds 31 bytes, fewer than 32"):
        load_key(short)


def test_only_kubernetes_workspaces_with_a_key_get_a_secret(key_file: Path) -> None:
    with_key = kube_settings("http://127.0.0.1:9", ide_key_file=str(key_file))
    w1 = WorkspaceSpec(id="w1", owner="alice", incarnation="uid-1")
    assert secret_for(Config(runtime="kubernetes", kubernetes=with_key), w1) == ide_secret(KEY, "w1", "uid-1")
    assert secret_for(Config(runtime="kubernetes", kubernetes=kube_settings("http://127.0.0.1:9")), w1) is None
    assert secret_for(Config(runtime="local", kubernetes=with_key), w1) is None


def pod_secret(kube: KubeEnv) -> str:
    pod = kube.emulator.get_object(POD, NS, "ws-w1")
    assert pod is not None
    (container,) = pod["spec"]["containers"]
    return str(next(item["value"] for item in container["env"] if item["name"] == "HASHED_PASSWORD"))


async def test_a_namesake_of_a_deleted_workspace_gets_a_secret_of_its_own(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime, key_file: Path) -> None:
    """The owner of a workspace learns its IDE secret (the gateway sends it to whatever listens on the IDE port,
    and code-server's /proc/PID/environ keeps it). Once that workspace is deleted and someone else makes one of
    the same name, the old secret must not open the new owner's IDE from beside the gateway."""
    runtime = await make_runtime(ide_key_file=str(key_file))
    await runtime.create_workspace(WorkspaceSpec(id="w1", owner="alice"))
    await runtime.wake("w1")
    alices = pod_secret(kube)
    await runtime.delete("w1")
    await kube.emulator.wait_gone(WORKSPACE, NS, "w1")
    await runtime.create_workspace(WorkspaceSpec(id="w1", owner="mallory"))
    await runtime.wake("w1")
    mallorys = pod_secret(kube)
    assert mallorys != alices
    # and the gateway sends the new pod its own secret, not the name's
    state = runtime.get("w1")
    assert state is not None
    config = Config(runtime="kubernetes", kubernetes=kube_settings(kube.url, ide_key_file=str(key_file)))
    assert secret_for(config, state.spec) == mallorys
