"""What every replica must agree on besides links and tokens: visitors' consent answers and used one-time keys.

- **Consent answers** (``IdentityConsent``, one per person and app, named by a hash of them): cached by list+watch
  in the runtime's informers like the token store's kinds, so a request reads memory; answering creates the
  object or, when the person had answered before, replaces its spec; withdrawing deletes it. Sealed as links and
  tokens are (``objects.record_seal``): an answer written past the gateway is no answer.
- **Used one-time keys** (``UsedKey``, named after the key): a hand-off code is admitted once in total because
  the API server creates an object of a name once (409 after), whichever replica asks; no replica's memory could
  promise that. Each replica deletes those past their time now and then (any replica's: one may have died first).
- **Ended sign-ins** (a ``UsedKey`` named ``sign-out-<id>``, labelled ``codehub.dev/used-for=sign-out``, until the
  sign-in would have expired): cached by list+watch of that label alone, so a request reads memory, and deleted
  past their time with the other used keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from gateway.auth.sessions import Ended, SignIn
from gateway.auth.store import ENDED, Consent
from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.kubernetes.client import CONSENT, USED_KEY, KubeClient, KubeError, Resource, retrying
from gateway.lifecycle.kubernetes.informer import Informers
from gateway.lifecycle.kubernetes.objects import MANAGED_BY, micro_time, parse_time, sealed, with_seal

T = TypeVar("T")
Obj = dict[str, Any]


async def refused_as_error(call: Callable[[], Awaitable[T]], attempts: int) -> T:
    """One API call, retried while the failure is transient; a refusal becomes the gateway's error."""
    try:
        return await retrying(call, attempts=attempts)
    except KubeError as exc:
        raise LifecycleError(f"Kubernetes refused the operation: {exc.message or exc.reason}",
                            code="kubernetes-refused") from exc


async def create_sealed(client: KubeClient, kind: Resource, body: Obj, attempts: int) -> Obj | None:
    """Create a sealed record (None: its name is taken), and make sure the cluster kept its seal.

    Helm never upgrades a CRD it installed: a cluster still on the definition from before ``spec.seal`` prunes the
    field without a word, and every record made would be refused by every replica. That is said here, to whoever
    asked for the record, and the object goes again."""
    created = await refused_as_error(lambda: client.create(kind, body), attempts)
    seal = body["spec"].get("seal")
    if created is None or seal is None or (created.get("spec") or {}).get("seal") == seal:
        return created
    meta = created.get("metadata") or {}
    with contextlib.suppress(LifecycleError):
        await refused_as_error(lambda: client.delete(kind, str(meta.get("name")), uid=meta.get("uid")), attempts)
    raise LifecycleError(f"The cluster's {kind.kind} definition drops spec.seal: apply the chart's CRDs "
                         "(charts/codehub-gateway/crds) and try again.", code="kubernetes-refused")


def _at(epoch: float) -> str:
    return micro_time(datetime.datetime.fromtimestamp(epoch, datetime.UTC))


def make_consent(consent: Consent, key: bytes | None = None) -> Obj:
    """With ``key``, sealed (``objects.record_seal``)."""
    return with_seal({"apiVersion": CONSENT.api_version, "kind": CONSENT.kind,
                      "metadata": {"name": consent.id, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
                      "spec": {"subject": consent.subject, "workspace": consent.workspace, "port": consent.port,
                               "share": consent.share, "claims": list(consent.claims),
                               "answered": _at(consent.at)}}, CONSENT.kind, key)


def parse_consent(obj: Mapping[str, Any]) -> Consent | None:
    """None when malformed: then it records no answer, and the visitor is asked again."""
    spec = obj.get("spec") or {}
    subject, workspace, port, share = spec.get("subject"), spec.get("workspace"), spec.get("port"), spec.get("share")
    if not (isinstance(subject, str) and isinstance(workspace, str) and isinstance(port, int)
            and isinstance(share, bool)):
        return None
    answered = parse_time(spec.get("answered"))
    return Consent(str(obj["metadata"]["name"]), subject, workspace, port, share,
                   [str(claim) for claim in spec.get("claims") or ()],
                   answered.timestamp() if answered is not None else 0.0)


USED_FOR = "codehub.dev/used-for"


def make_used_key(key: str, holder: str, until: float, *, used_for: str = "handoff") -> Obj:
    return {"apiVersion": USED_KEY.api_version, "kind": USED_KEY.kind,
            "metadata": {"name": key, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, USED_FOR: used_for}},
            "spec": {"usedBy": holder, "forgetAfter": _at(until + 1)}}


class Consents:
    """This replica's view of every consent answer, and the writes that change them."""

    kind = CONSENT

    def __init__(self, informers: Informers, *, attempts: int, key: bytes | None) -> None:
        self._attempts = attempts
        self._key = key
        self.answers: dict[str, Consent] = {}
        informers.register(CONSENT, self._changed)

    async def record(self, client: KubeClient, consent: Consent) -> None:
        body = make_consent(consent, self._key)
        if await create_sealed(client, CONSENT, body, self._attempts) is None:
            await refused_as_error(lambda: client.patch(CONSENT, consent.id, {"spec": body["spec"]}), self._attempts)
        self.answers[consent.id] = consent  # this replica at once; the others when their watch delivers it

    async def withdraw(self, client: KubeClient, consent: Consent) -> None:
        await refused_as_error(lambda: client.delete(CONSENT, consent.id), self._attempts)  # 404: already gone
        self.answers.pop(consent.id, None)

    def _changed(self, event: str, obj: Obj) -> None:
        """An answer without a valid seal is no answer: the visitor is asked again."""
        name = str(obj["metadata"]["name"])
        consent = parse_consent(obj) if event != "DELETED" and sealed(self._key, CONSENT.kind, obj) else None
        if consent is None:
            self.answers.pop(name, None)
        else:
            self.answers[name] = consent


class EndedSignIns:
    """This replica's view of the sign-ins signed out before their time, and the write that adds one."""

    kind = USED_KEY
    selector = f"{USED_FOR}=sign-out"

    def __init__(self, informers: Informers) -> None:
        self.ids = Ended()  # no file to lose: no cut-off
        informers.register(USED_KEY, self._changed, label_selector=self.selector)

    async def end(self, used: UsedKeys, sign_in: SignIn) -> None:
        """Recorded once whichever replica is asked (a second sign-out of it is a 409, and changes nothing)."""
        await used.use_once(ENDED + sign_in.id, sign_in.expires, used_for="sign-out")
        self.ids[sign_in.id] = sign_in.expires  # this replica at once; the others when their watch delivers it

    def _changed(self, event: str, obj: Obj) -> None:
        sign_in = str(obj["metadata"]["name"]).removeprefix(ENDED)
        after = parse_time((obj.get("spec") or {}).get("forgetAfter"))
        if event == "DELETED" or after is None:
            self.ids.pop(sign_in, None)
        else:
            self.ids[sign_in] = after.timestamp()


class UsedKeys:
    def __init__(self, client: KubeClient, holder: str, *, attempts: int) -> None:
        self.client = client
        self._holder = holder
        self._attempts = attempts

    async def use_once(self, key: str, until: float, *, used_for: str = "handoff") -> bool:
        client, body = self.client, make_used_key(key, self._holder, until, used_for=used_for)
        return await refused_as_error(lambda: client.create(USED_KEY, body), self._attempts) is not None

    async def forget(self, now: float) -> int:
        """Delete the keys past their time; how many this call deleted."""
        forgotten = 0
        for item in (await self.client.list(USED_KEY))["items"]:
            after = parse_time((item.get("spec") or {}).get("forgetAfter"))
            if (after is None or after.timestamp() < now) and await self.client.delete(USED_KEY,
                                                                                        item["metadata"]["name"]):
                forgotten += 1
        return forgotten

    async def forget_forever(self, every: float = 60.0) -> None:
        while True:
            with contextlib.suppress(KubeError):
                await self.forget(time.time())
            await asyncio.sleep(every)
