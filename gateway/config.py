"""Settings: a YAML file plus ``CODEHUB_*`` environment variables, validated once at start.

Every setting has one home here. A bad value stops start-up with one line that names the key and the problem
(``ConfigError``), because a gateway that half-starts with a typo in its config is worse than one that refuses.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

WORKSPACE_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
ENV_PREFIX = "CODEHUB_"
NOT_SETTINGS = frozenset({"CODEHUB_CONFIG", "CODEHUB_URL", "CODEHUB_TOKEN", "CODEHUB_WORKSPACE"})


def _not_a_boolean(value: Any) -> Any:
    """Pydantic takes ``true`` for the number 1, and YAML reads ``on`` and ``yes`` as true: ``port: on``
    listened on port 1, ``to_warm: yes`` put workspaces to sleep after a second."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false (YAML reads yes, no, on and off as true and false)")
    return value


_NUMBER = BeforeValidator(_not_a_boolean)
Count = Annotated[int, _NUMBER]
Port = Annotated[int, Field(ge=1, le=65535), _NUMBER]
PORT_TEXT = re.compile(r"[0-9]{1,5}")
"""A port number as text from outside (an address, a resource): ASCII digits only, as few as a port has, since
``str.isdigit`` admits "²" and int() then fails."""
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False), _NUMBER]
"""Finite: YAML's ``.inf`` passed ``gt=0`` and a sign-in's end, a whole number of seconds, failed every sign-in
(``null`` says "no limit" where there may be none)."""
_GATEWAY_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
Visibility = Literal["private", "org", "public"]


class ConfigError(Exception):
    """A setting is wrong; the message is one line naming the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listen_host(value: str) -> str:
    """Checked before binding: the hub and preview addresses are derived from it, and a space or a slash in it made
    the error name them instead."""
    if not (_is_ip(value) or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value)):
        raise ValueError("must be an IP address or a host name, like 127.0.0.1 or gateway.internal")
    return value


ListenHost = Annotated[str, AfterValidator(_listen_host)]


class Listen(_Model):
    host: ListenHost = "127.0.0.1"
    port: Port = 8080


class MetricsListen(_Model):
    """Where ``/metrics`` is served: a port of its own that no ingress routes, so the public hub and preview hosts
    never expose the gateway's internals (they answer 404 for ``/metrics``). No port: no metrics listener."""

    host: ListenHost = "127.0.0.1"
    port: Port | None = None


class Timeouts(_Model):
    """Upstream timeouts in seconds. ``connect``: one connection attempt. ``first_byte``: from a request sent to
    the head of its answer (a long poll answers within it; ``None`` waits for ever). ``read``: the longest silence
    in the middle of a body; ``None`` (the default) lets SSE streams and long polls stay open as long as the
    client does. ``queue``: how long a request may wait in the gateway for a connection to a busy upstream.
    ``shutdown``: how long requests in flight may take to finish once the gateway is told to stop (both lanes, every
    worker); a workspace process's own grace is ``local.stop_timeout``."""

    connect: Seconds = 5.0
    first_byte: Seconds | None = 120.0
    read: Seconds | None = None
    queue: Seconds = 60.0
    websocket_heartbeat: Seconds = 30.0
    shutdown: Seconds = 10.0


MOST_HEAD_BYTES = 1 << 20
"""The ceiling of ``limits.request_line`` and ``limits.header_size`` (Go's default for a whole head): ten more
zeros passed, and the gateway printed its URLs, then reset every connection (the parser takes a C ``size_t``)."""


class Limits(_Model):
    """What one client may ask of the gateway; past each limit it gets a clear status, never a hang or a crash.

    ``request_line`` and ``header_size`` (bytes) and ``header_count`` bound a request head (414, 431); ``body``
    bounds a request body the gateway reads itself (hub, API, sign-in forms: 413), while bodies for previews stream
    through unlimited. ``connections`` is per worker process (past it a new connection gets 503 and is closed);
    ``None`` sets it from the open-file limit, so the gateway refuses connections before ``accept`` runs out of
    file descriptors. ``keepalive`` (s) closes a client connection idle between requests; ``head_timeout`` (s)
    is how long a client may take to send a whole head (a slowloris dribbling one gets 408); ``body_timeout`` (s)
    is the longest silence in the middle of a request body streamed to a preview (408 past it: a silent upload
    would otherwise hold a place among its port's requests in flight for ever; ``None``: no bound), and the
    longest a body the gateway reads itself may take in all (a head whose body never came held its connection);
    ``send_timeout`` (s) the longest a client may take nothing of an answer streamed to it (its connection is
    then closed: a client that never reads would hold the answer, its upstream connection and that place)."""

    request_line: Count = Field(default=8190, ge=256, le=MOST_HEAD_BYTES)
    header_size: Count = Field(default=8190, ge=256, le=MOST_HEAD_BYTES)
    header_count: Count = Field(default=100, ge=8, le=10_000)
    body: Count = Field(default=1 << 20, ge=1024)
    connections: Count | None = Field(default=None, ge=1)
    keepalive: Seconds = 75.0
    head_timeout: Seconds = 20.0
    body_timeout: Seconds | None = 60.0
    send_timeout: Seconds | None = 60.0


class Idle(_Model):
    """Idle timers in seconds: RUNNING → WARM after ``to_warm``, WARM → COLD after ``to_cold`` more."""

    to_warm: Seconds = 30 * 60
    to_cold: Seconds = 7 * 24 * 3600
    check_every: Seconds = 30.0


_PLACEHOLDERS = frozenset({"host", "home", "ide_port", "workspace"})
"""What a local workspace's command may name (``LocalRuntime._command`` fills them in)."""


class LocalWorkspace(_Model):
    owner: str
    collaborators: tuple[str, ...] = ()
    command: tuple[str, ...]
    env: dict[str, str] = Field(default_factory=dict)
    ide_port: Port = 13337
    address: str | None = None
    ports: dict[Port, Visibility] = Field(default_factory=dict)
    https_ports: tuple[Port, ...] = ()

    @field_validator("command")
    @classmethod
    def _command_template(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name a program to run")
        for part in value:
            try:
                # The names alone: ``{host.x}`` or ``{home[0]}`` would reach into the values' attributes and items
                # (an AttributeError here, or a part that formats differently on the day).
                unknown = [name for _, name, _, _ in string.Formatter().parse(part)
                           if name is not None and name not in _PLACEHOLDERS]
                if unknown:
                    raise KeyError(unknown[0])
                part.format(host="", home="", ide_port=0, workspace="")  # the format specs and conversions
            except (KeyError, ValueError) as exc:
                raise ValueError(
                    f"{part!r}: unknown placeholder {exc}; use {{host}}, {{home}}, {{ide_port}} or {{workspace}}"
                ) from None
        return value

    @field_validator("address")
    @classmethod
    def _loopback(cls, value: str | None) -> str | None:
        """An address of 127.0.0.0/8 that nothing else listens on: the runtime reads the workspace's listeners on
        it from /proc/net/tcp (IPv4 only), and every port on it is the workspace's own to share."""
        if value is None:
            return value
        address = ipaddress.ip_address(value)
        if address.version != 4 or not address.is_loopback:
            raise ValueError("must be an IPv4 loopback address (127.0.0.0/8), like 127.0.0.9")
        if address == _GATEWAY_LOOPBACK:
            raise ValueError("127.0.0.1 is the gateway's own (and every local service's): a workspace on it would "
                             "share their ports; pick another address of 127.0.0.0/8, like 127.0.0.9")
        return str(address)


class Oidc(_Model):
    """The company IdP. The redirect URI to register there is ``{hub_url}/auth/callback``."""

    issuer: str
    client_id: str
    client_secret: str | None = None
    client_secret_file: Path | None = None
    scopes: tuple[str, ...] = ("openid", "email", "profile", "groups")
    username_claim: str = "sub"
    groups_claim: str = "groups"
    token_auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    sign_out_at_idp: bool = True
    """Sign out ends the IdP's session too, where the IdP supports it: register ``{hub_url}/`` there as a
    post-logout redirect URI."""

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be the IdP's issuer URL, like https://sso.example.com/realms/main")
        return value.rstrip("/")

    def secret(self) -> str:
        if self.client_secret_file is not None:
            try:
                return self.client_secret_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"config error: auth.oidc.client_secret_file: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError("config error: auth.oidc.client_secret_file: not UTF-8 text") from None
        return self.client_secret or ""


SESSION_TTL = 12 * 3600
"""How long a sign-in lasts unless ``auth.session_ttl`` says otherwise."""


class Auth(_Model):
    """Sign-in. ``dev`` (pick any user name) is for a laptop only and refuses non-loopback addresses."""

    mode: Literal["dev", "oidc"] = "dev"
    oidc: Oidc | None = None
    session_ttl: Seconds = SESSION_TTL
    keys_file: Path | None = None
    store_file: Path | None = None
    allow_dev_on_network: bool = False


_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML was built with it: the pure-Python one took 5 s for 10,000 workspaces."""


class YamlLoader(_SAFE_LOADER):  # type: ignore[valid-type,misc]
    """The safe loader, refusing a key given twice in one mapping. YAML keeps the last without a word, so a second
    ``auth:`` added further down for its ``session_ttl`` dropped ``mode: oidc`` (and a second ``ports:`` in a policy
    its ``denied``). Keys a merge (``<<: *base``) brings in are YAML's way to be overridden, not given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: construct_mapping says so with its own mark
                    break
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key} is given twice, first on line {first.start_mark.line + 1}; the second "
                        "would silently replace the first", key_node.start_mark)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


MOST_NESTING = 200
"""Collections inside collections in a settings or policy file (they use 5 or 6): libyaml's composer recurses in C,
and a flow list 100,000 deep (200 KB) crashed the process with a segmentation fault."""


def load_yaml(text: str) -> Any:
    """``text`` as YAML with ``YamlLoader``, first read as events (libyaml's parser keeps its own stack) to refuse
    nesting past ``MOST_NESTING`` with a ``YAMLError`` that has its mark: about 15 % more time than the load."""
    depth = 0
    for event in yaml.parse(text, Loader=_SAFE_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MOST_NESTING:
                raise yaml.MarkedYAMLError(problem=f"nested more than {MOST_NESTING} deep",
                                           problem_mark=event.start_mark)  # type: ignore[arg-type]  # libyaml's
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.load(text, Loader=YamlLoader)


MOST_LOCAL_WORKSPACES = 64_768
"""One loopback address each, 253 per 127.0.N.0/24 (``.2`` to ``.254``) over 127.0.0.0/16."""


class Local(_Model):
    state_dir: Path = Path(".codehub")
    stop_timeout: Seconds = 10.0
    """Seconds a workspace process gets between SIGTERM and SIGKILL."""
    workspaces: dict[str, LocalWorkspace] = Field(default_factory=dict)

    @field_validator("workspaces")
    @classmethod
    def _ids(cls, value: dict[str, LocalWorkspace]) -> dict[str, LocalWorkspace]:
        for name in value:
            if not WORKSPACE_ID.fullmatch(name):
                raise ValueError(f"workspace id {name!r} must match {WORKSPACE_ID.pattern}")
        if len(value) > MOST_LOCAL_WORKSPACES:
            raise ValueError(f"at most {MOST_LOCAL_WORKSPACES} local workspaces (one loopback address each)")
        return value

    @model_validator(mode="after")
    def _addresses_are_distinct(self) -> Local:
        """Workspaces sharing an address share every port: one owner's public port would serve another's
        private server."""
        holders: dict[str, str] = {}
        for name, address in self.addresses().items():
            other = holders.setdefault(address, name)
            if other != name:
                handed = next((f" ({who}'s handed out by its place in the list)" for who in (other, name)
                               if self.workspaces[who].address is None), "")
                raise ValueError(f"workspaces {other} and {name} both have address {address}{handed}; "
                                 "each needs one of its own")
        return self

    def addresses(self) -> dict[str, str]:
        """Each workspace's loopback address: its own ``address``, else one handed out by its place in the list."""
        return {name: ws.address or default_address(index)
                for index, (name, ws) in enumerate(self.workspaces.items())}


def default_address(index: int) -> str:
    """The loopback address of the ``index``-th configured workspace without one: 127.0.0.2 … 127.0.0.254, then
    127.0.1.2 …, so ten thousand workspaces still get one each (never .0, .1 or .255 at the end)."""
    block, rest = divmod(index, 253)
    return f"127.0.{block}.{rest + 2}"


_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|E|Ei)?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _quantities(value: dict[str, str], key: str) -> dict[str, str]:
    for name, quantity in value.items():
        if not _QUANTITY.fullmatch(str(quantity)):
            raise ValueError(f"{key}.{name}: {quantity!r} is not a Kubernetes quantity like 500m, 2 or 4Gi")
    return value


class KubernetesResources(_Model):
    """Requests and limits of a workspace pod (a Workspace's own ``spec.resources`` wins)."""

    requests: dict[str, str] = Field(default_factory=lambda: {"cpu": "250m", "memory": "512Mi"})
    limits: dict[str, str] = Field(default_factory=lambda: {"cpu": "2", "memory": "4Gi"})

    @field_validator("requests", "limits")
    @classmethod
    def _valid(cls, value: dict[str, str]) -> dict[str, str]:
        return _quantities(value, "resources")


class Kubernetes(_Model):
    """The Kubernetes runtime: where workspaces run and how they are built.

    The API is found by ``api_url`` (tests, ``kubectl proxy``), else in-cluster (``in_cluster: true``, the service
    account), else ``kubeconfig`` (or the default kubeconfig).
    """

    namespace: str = "codehub"
    api_url: str | None = None
    in_cluster: bool = False
    kubeconfig: Path | None = None
    image: str = "codercom/code-server:4.99.0"
    ide_port: Port = 13337
    storage_class: str | None = None
    snapshot_class: str | None = None
    storage_size: str = "10Gi"
    tmp_size: str = "1Gi"
    read_only_root: bool = True
    resources: KubernetesResources = KubernetesResources()
    keep_snapshots: Count = Field(default=2, ge=1)
    # Where and how workspace pods are scheduled (passed to the pod spec as they are).
    image_digest: str | None = None  # sha256:…: run exactly this build of ``image`` (not the tag's latest)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    priority_class: str | None = None
    lease_name: str = "codehub-gateway-reaper"
    lease_duration: Seconds = 15.0
    identity: str | None = None
    start_timeout: Seconds = 300.0
    # A start that cannot succeed ends before start_timeout, with the cluster's reason (starting.judge):
    unschedulable_grace: Seconds = 120.0  # no node fits the pod this long
    bind_timeout: Seconds = 180.0  # the home PVC still Pending (not provisioned, or restoring) this long
    image_pull_grace: Seconds = 90.0  # ErrImagePull / ImagePullBackOff this long (one failed pull may be transient)
    snapshot_timeout: Seconds = 600.0
    sync_timeout: Seconds = 30.0  # no page of a list for this long fails the start (a big first fill may take longer)
    ready_grace: Seconds = 30.0  # /readyz fails once a cache has been cut off from the API for this long
    ide_key_file: Path | None = None  # with it, each IDE requires its HMAC secret (gateway/auth/ide.py), and share
    # links and API tokens are sealed (objects.record_seal); without it neither
    request_timeout: Seconds = 10.0
    watch_timeout: Count = Field(default=300, ge=1)
    activity_interval: Seconds = 60.0
    # What the gateway asks of the API server (per replica): a token bucket and a bound on requests in flight.
    api_qps: Annotated[float, _NUMBER] = Field(default=20.0, gt=0)
    api_burst: Count = Field(default=40, ge=1)
    api_concurrency: Count = Field(default=16, ge=1)
    list_page_size: Count = Field(default=500, ge=1)  # lists are fetched in pages (limit/continue)
    share_retention: Seconds = 86400.0  # expired share links stay listed this long, then the leader deletes them
    share_prune_interval: Seconds = 300.0
    usage_interval: Seconds = 5.0  # share link / API token use counts: at most one status write per interval

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError("must be a Kubernetes namespace name (lower-case letters, digits and '-')")
        return value

    @field_validator("storage_size", "tmp_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not _QUANTITY.fullmatch(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity like 10Gi")
        return value

    @field_validator("image_digest")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise ValueError(f"{value!r} is not an image digest like sha256:<64 hex digits>")
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        if value is not None:
            url = URL(value)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError("must be the API server's URL, like https://10.0.0.1:6443")
            return value.rstrip("/")
        return value


class Config(_Model):
    listen: Listen = Listen()
    metrics: MetricsListen = MetricsListen()
    hub_url: str = "http://localhost:8080"
    preview_domain: str = "localhost:8080"
    trusted_proxies: tuple[str, ...] = ()
    policy_file: Path | None = None
    auth: Auth = Auth()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    idle: Idle = Idle()
    max_ws_message: Count = Field(default=64 << 20, gt=0)
    runtime: Literal["local", "kubernetes"] = "local"
    local: Local = Local()
    kubernetes: Kubernetes = Kubernetes()

    @field_validator("hub_url")
    @classmethod
    def _hub_url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
            raise ValueError("must be an http(s) URL with a host and no path, like https://hub.example.com")
        return str(url.origin())

    @field_validator("preview_domain")
    @classmethod
    def _preview_domain(cls, value: str) -> str:
        value = value.lower().rstrip(".")
        port = value.partition(":")[2]
        if (not re.fullmatch(r"[a-z0-9.-]+(:[0-9]{1,5})?", value) or value.startswith((".", "-"))
                or (port and not 1 <= int(port) <= 65535)):
            raise ValueError("must be a host name with an optional port (1-65535), like preview.example.com")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    @model_validator(mode="before")
    @classmethod
    def _addresses_follow_listen(cls, data: Any) -> Any:
        """Unset hub and preview addresses follow the listen address, so ``serve --port 9000`` links to :9000. A bad
        listen address is named as itself: ``listen`` is checked before the addresses made of it, and the first
        error is the one reported."""
        if not isinstance(data, dict) or ("hub_url" in data and "preview_domain" in data):
            return data
        listen = data.get("listen")
        listen = listen if isinstance(listen, dict) else {}
        default = Listen()
        host, port = str(listen.get("host", default.host)), listen.get("port", default.port)
        name = _public_name(host)
        if name is None:
            return data  # nothing to follow; _addresses_are_usable says so once auth is known to be safe
        return {"hub_url": f"http://{name}:{port}", "preview_domain": f"{name}:{port}", **data}

    @model_validator(mode="after")
    def _auth_is_safe(self) -> Config:
        if self.auth.mode == "oidc" and self.auth.oidc is None:
            raise ValueError("auth.mode is oidc but auth.oidc (issuer, client_id, client_secret) is not set")
        if self.auth.mode == "dev" and not self.auth.allow_dev_on_network and not _is_loopback(self.listen.host):
            raise ValueError(
                f"auth.mode is dev (anyone can sign in as anyone) but listen.host {self.listen.host} is not "
                "loopback; configure auth.oidc, or set auth.allow_dev_on_network: true to force it"
            )
        unset = {"hub_url", "preview_domain"} - self.model_fields_set  # one alone would keep localhost:8080
        if unset and _public_name(self.listen.host) is None:
            field = "preview_domain" if "preview_domain" in unset else "hub_url"
            raise ValueError(f"{field}: previews need a host name with subdomains and "
                             f"{self.listen.host} has none; set hub_url and preview_domain (or listen on 127.0.0.1)")
        return self

    @model_validator(mode="after")
    def _kubeconfig_is_readable(self) -> Config:
        """The cluster client reads it only once the gateway starts, and says of a missing file only that it has
        no current-context: a path that is wrong is better named here."""
        path = self.kubernetes.kubeconfig
        if self.runtime != "kubernetes" or path is None or self.kubernetes.api_url or self.kubernetes.in_cluster:
            return self
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ValueError(f"kubernetes.kubeconfig: cannot read {path}: {exc.strerror}") from None
        return self

    @model_validator(mode="after")
    def _workspaces_are_not_the_gateway(self) -> Config:
        """A workspace on the gateway's own listen address would have the hub, /healthz or /metrics as ports."""
        if self.runtime != "local":
            return self
        listening = {key: host for key, host in (("listen.host", self.listen.host), ("metrics.host", self.metrics.host))
                     if _is_ip(host)}
        for name, address in self.local.addresses().items():
            for key, host in listening.items():
                if ipaddress.ip_address(host) == ipaddress.ip_address(address):
                    raise ValueError(f"local.workspaces.{name}.address: {address} is {key}: its ports would be the "
                                     "gateway's own; pick another address of 127.0.0.0/8")
        return self

    @model_validator(mode="after")
    def _metrics_port_is_its_own(self) -> Config:
        if self.metrics.port == self.listen.port:
            raise ValueError(f"metrics.port {self.metrics.port} is listen.port too; /metrics needs a port of its own "
                             "that the ingress does not route, like 9090")
        return self

    @property
    def state_dir(self) -> Path:
        return self.local.state_dir

    @property
    def keys_file(self) -> Path:
        return self.auth.keys_file or self.state_dir / "signing-keys.json"

    @property
    def store_file(self) -> Path:
        return self.auth.store_file or self.state_dir / "tokens.json"

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    @property
    def scheme(self) -> str:
        return URL(self.hub_url).scheme

    def proxy_uri(self, workspace: str) -> str:
        """code-server's ``VSCODE_PROXY_URI`` for a workspace: its share URL with ``{{port}}`` for the port, so the
        IDE's Ports view and "Open in Browser" lead to the gateway's authenticated previews."""
        name, _, port = self.preview_domain.partition(":")
        default = {"http": "80", "https": "443"}[self.scheme]
        return f"{self.scheme}://{{{{port}}}}-{workspace}.{name if port in ('', default) else self.preview_domain}/"


def _public_name(host: str) -> str | None:
    """The name browsers reach a listen address by: ``localhost`` for 127.0.0.1 and the wildcards, a DNS name as
    it is; None for other IP addresses (``*.{ip}`` names do not exist, so previews could not work)."""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::"):
        return "localhost"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {'.'.join(path)}: {key} is not a section")
        tree = node
    tree[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``CODEHUB_LISTEN__PORT=9000`` becomes ``{"listen": {"port": 9000}}``; values are read as YAML scalars."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value = load_yaml(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        _set_path(tree, path, value)
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_SERVICE_LINK = re.compile(r"(?P<service>[A-Z0-9_]+?)_(?:SERVICE_(?:HOST|PORT)(?:_[A-Z0-9_]+)?|PORT_[0-9]+_"
                           r"(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?|(?P<bare>PORT))")
"""What Kubernetes names the variables it sets for each Service of the namespace (``enableServiceLinks``); the
bare ``{SERVICE}_PORT`` only with its value, ``tcp://…`` (``CODEHUB_METRICS_PORT=9090`` is a typo of ours)."""


def _describe(error: ValidationError, environment: Mapping[str, Any]) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"] if part != "[key]")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting" + _from_environment(first["loc"], environment)
    return f"config error: {key}: {message}" if key else f"config error: {message}"


def _from_environment(loc: tuple[int | str, ...], environment: Mapping[str, Any]) -> str:
    """Where an unknown setting came from, if a ``CODEHUB_*`` variable set it: nobody finds it in their file."""
    node: Any = environment
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    name = ENV_PREFIX + "__".join(str(part) for part in loc).upper()
    link = _SERVICE_LINK.fullmatch(name)
    if link is None or (link["bare"] and "://" not in str(node)):
        return f", from the environment variable {name}"
    service = link["service"].lower().replace("_", "-")
    return (f", from the environment variable {name}, which Kubernetes sets for a Service named {service}: set "
            "enableServiceLinks: false in the gateway's pod")


_FILE_PATHS = (("local", "state_dir"), ("policy_file",), ("auth", "keys_file"), ("auth", "store_file"),
               ("auth", "oidc", "client_secret_file"), ("kubernetes", "kubeconfig"))


def _anchor_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths in a file are read from the file's folder, so a CLI command run from anywhere finds the
    same state (signing keys, token file) as the gateway that was started with that file."""
    data = dict(data)
    for keys in _FILE_PATHS:
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node[key] = node = dict(node[key])
        else:
            value = node.get(keys[-1])
            if isinstance(value, str) and value:  # ~ as a shell would read it: nothing else expands it later
                path = Path(value).expanduser()
                node[keys[-1]] = str(path if path.is_absolute() else folder / path)
    return data


def demo_settings() -> dict[str, Any]:
    """The embedded default: one workspace, ``demo``, whose port 8000 serves a small page."""
    return {
        "local": {
            "workspaces": {
                "demo": {
                    "owner": "dev",
                    "ports": {8000: "public"},
                    "command": [sys.executable, "-m", "gateway.demo", "--host", "{host}",
                                "--ide-port", "{ide_port}", "--home", "{home}"],
                }
            }
        }
    }


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the YAML file (or the embedded demo default when there is none), then the environment, then
    ``overrides`` (command-line flags)."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("CODEHUB_CONFIG"):
        path = Path(environ["CODEHUB_CONFIG"])
    if path is None:
        data = demo_settings()
    else:
        try:
            data = load_yaml(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config error: {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # a reader's error: no mark, 2 lines
            raise ConfigError(f"config error: {where}: not valid YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {path}: the top level must be a mapping of settings")
        data = _anchor_paths(data, path.resolve().parent)
    environment = env_overrides(environ)
    data = _merge(_merge(data, environment), overrides or {})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, environment)) from None
