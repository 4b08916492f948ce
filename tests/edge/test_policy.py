"""Policy decisions as a pure function (tables of callers, ports and grants), policy files and their reload."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from gateway.auth.identity import Identity
from gateway.edge.policy import (
    AsleepElsewhere,
    CorsRule,
    Decision,
    Grant,
    IdentityRules,
    Org,
    Policy,
    PolicyError,
    PolicyHolder,
    Ports,
    Reason,
    WakePolicy,
    decide,
    denial,
    describe_duration,
    is_org_member,
    load_policy,
    may_wake,
    membership,
    parse_duration,
    parse_policy,
)
from gateway.errors import Forbidden, GatewayError, Unauthorized
from gateway.lifecycle import WorkspaceSpec

REPO = Path(__file__).resolve().parents[2]
SPEC = WorkspaceSpec(
    id="ws1", owner="alice", collaborators=("bob", "carol@example.com", "group:qa"), ide_port=13337,
    ports={3000: "private", 4000: "org", 5000: "public"},
)
POLICY = Policy(
    org=Org(email_domains=("corp.test",), groups=("staff",), users=("heidi",), claims={"hd": "corp.test"}),
    ports=Ports(denied=(22,)),
    admins=("root", "group:sre"),
)

ALICE = Identity("alice", "alice@example.com", ("dev",))
BOB = Identity("bob", "bob@example.com")
CAROL = Identity("carol2", "Carol@Example.COM")
DAVE = Identity("dave", "dave@example.com", ("qa",))
ROOT = Identity("root", "root@example.com")
SRE = Identity("sam", "sam@example.com", ("sre",))
FRANK = Identity("frank", "frank@corp.test")
FRANK_UPPER = Identity("frank", "Frank@CORP.test")
LOOKALIKE = Identity("fred", "fred@evilcorp.test")
SUFFIXED = Identity("fred", "fred@corp.test.evil")
SUBDOMAIN = Identity("fred", "fred@sub.corp.test")
GRACE = Identity("grace", "grace@elsewhere.test", ("staff",))
HEIDI = Identity("heidi", "heidi@elsewhere.test")
HOSTED = Identity("ivan", "ivan@gmail.test", attributes=(("hd", "corp.test"),))
OTHER_HOSTED = Identity("ivan", "ivan@gmail.test", attributes=(("hd", "other.test"),))
HOSTED_LEVEL_3 = Identity("ivan", "ivan@gmail.test", attributes=(("hd", "corp.test"), ("level", "3")))
TWO_CLAIMS = Policy(org=Org(claims={"hd": "corp.test", "level": "3"}))
EVE = Identity("eve", "eve@evil.test", ("dev",))
OPS = Identity("olga", "olga@evil.test", ("ops",))

ANYONE = Grant("s1", "ws1", 3000, "anyone")
ANYONE_ALL_PORTS = Grant("s2", "ws1", None, "anyone")
ANYONE_4000 = Grant("s3", "ws1", 4000, "anyone")
ANYONE_WS2 = Grant("s4", "ws2", None, "anyone")
ORG = Grant("s5", "ws1", 3000, "org")
PEOPLE = Grant("s6", "ws1", 3000, "people", ("eve@evil.test", "group:ops", "Mallory"))

R = Reason
CASES = [
    # name, policy, port, identity, grant, allow, reason
    ("owner private", POLICY, 3000, ALICE, None, True, R.OWNER),
    ("owner unlisted port", POLICY, 8080, ALICE, None, True, R.OWNER),
    ("owner denied port", POLICY, 22, ALICE, None, False, R.PORT_DENIED),
    ("IDE port is not a preview", POLICY, 13337, ALICE, None, False, R.PORT_DENIED),
    ("collaborator by name", POLICY, 3000, BOB, None, True, R.COLLABORATOR),
    ("collaborator by email, any case", POLICY, 3000, CAROL, None, True, R.COLLABORATOR),
    ("collaborator by group", POLICY, 3000, DAVE, None, True, R.COLLABORATOR),
    ("admin by name", POLICY, 3000, ROOT, None, True, R.ADMIN),
    ("admin by group", POLICY, 3000, SRE, None, True, R.ADMIN),
    ("admin not on denied port", POLICY, 22, ROOT, None, False, R.PORT_DENIED),
    ("outsider private", POLICY, 3000, EVE, None, False, R.NOT_SHARED_WITH_USER),
    ("anonymous private", POLICY, 3000, None, None, False, R.USER_UNAUTHENTICATED),
    ("anonymous unlisted (default private)", POLICY, 8080, None, None, False, R.USER_UNAUTHENTICATED),
    ("anonymous public", POLICY, 5000, None, None, True, R.PUBLIC_PORT),
    ("outsider public", POLICY, 5000, EVE, None, True, R.PUBLIC_PORT),
    ("anonymous public but denied", Policy(ports=Ports(denied=(5000,))), 5000, None, None, False, R.PORT_DENIED),
    ("anonymous org", POLICY, 4000, None, None, False, R.USER_UNAUTHENTICATED),
    ("org by email domain", POLICY, 4000, FRANK, None, True, R.ORG_MEMBER),
    ("org by email domain, any case", POLICY, 4000, FRANK_UPPER, None, True, R.ORG_MEMBER),
    ("org domain look-alike", POLICY, 4000, LOOKALIKE, None, False, R.NOT_ORG_MEMBER),
    ("org domain with a suffix", POLICY, 4000, SUFFIXED, None, False, R.NOT_ORG_MEMBER),
    ("org subdomain is another domain", POLICY, 4000, SUBDOMAIN, None, False, R.NOT_ORG_MEMBER),
    ("org by group", POLICY, 4000, GRACE, None, True, R.ORG_MEMBER),
    ("org by user", POLICY, 4000, HEIDI, None, True, R.ORG_MEMBER),
    ("org by claim", POLICY, 4000, HOSTED, None, True, R.ORG_MEMBER),
    ("org claim with another value", POLICY, 4000, OTHER_HOSTED, None, False, R.NOT_ORG_MEMBER),
    ("org claims: every one listed", TWO_CLAIMS, 4000, HOSTED_LEVEL_3, None, True, R.ORG_MEMBER),
    ("org claims: one of two is not enough", TWO_CLAIMS, 4000, HOSTED, None, False, R.NOT_ORG_MEMBER),
    ("org with no rules admits nobody", Policy(), 4000, FRANK, None, False, R.NOT_ORG_MEMBER),
    # no address, or one with nothing after its '@': no domain, so no domain rule admits it
    ("org domain, no address", POLICY, 4000, Identity("nomail"), None, False, R.NOT_ORG_MEMBER),
    ("org domain, address without one", POLICY, 4000, Identity("x", "x@"), None, False, R.NOT_ORG_MEMBER),
    ("org member on a private port", POLICY, 3000, FRANK, None, False, R.NOT_SHARED_WITH_USER),
    ("default visibility org", Policy(org=POLICY.org, ports=Ports(default_visibility="org")), 8080, FRANK, None,
     True, R.ORG_MEMBER),
    ("ceiling org caps public: anonymous", Policy(ports=Ports(max_visibility="org")), 5000, None, None, False,
     R.USER_UNAUTHENTICATED),
    ("ceiling org caps public: org member", Policy(org=POLICY.org, ports=Ports(max_visibility="org")), 5000, FRANK,
     None, True, R.ORG_MEMBER),
    ("ceiling private caps org", Policy(org=POLICY.org, ports=Ports(max_visibility="private")), 4000, FRANK, None,
     False, R.NOT_SHARED_WITH_USER),
    ("ceiling private: owner still sees", Policy(ports=Ports(max_visibility="private")), 5000, ALICE, None, True,
     R.OWNER),
    ("IDE: owner", POLICY, None, ALICE, None, True, R.OWNER),
    ("IDE: collaborator", POLICY, None, DAVE, None, True, R.COLLABORATOR),
    ("IDE: admin is not the owner", POLICY, None, ROOT, None, False, R.IDE_OWNER_ONLY),
    ("IDE: org member", POLICY, None, FRANK, None, False, R.IDE_OWNER_ONLY),
    ("IDE: anonymous", POLICY, None, None, None, False, R.USER_UNAUTHENTICATED),
    ("IDE: anyone-link opens no IDE", POLICY, None, None, ANYONE_ALL_PORTS, False, R.USER_UNAUTHENTICATED),
    ("IDE: anyone-link, signed in", POLICY, None, EVE, ANYONE_ALL_PORTS, False, R.IDE_OWNER_ONLY),
    ("grant anyone, anonymous", POLICY, 3000, None, ANYONE, True, R.SHARE_LINK),
    ("grant anyone, outsider", POLICY, 3000, EVE, ANYONE, True, R.SHARE_LINK),
    ("grant for all ports", POLICY, 8080, None, ANYONE_ALL_PORTS, True, R.SHARE_LINK),
    ("grant for another port", POLICY, 3000, None, ANYONE_4000, False, R.SHARE_OTHER_TARGET),
    ("grant for another workspace", POLICY, 3000, None, ANYONE_WS2, False, R.SHARE_OTHER_TARGET),
    ("grant does not open a denied port", POLICY, 22, None, ANYONE_ALL_PORTS, False, R.PORT_DENIED),
    ("grant org, anonymous", POLICY, 3000, None, ORG, False, R.USER_UNAUTHENTICATED),
    ("grant org, org member", POLICY, 3000, FRANK, ORG, True, R.SHARE_LINK),
    ("grant org, outsider", POLICY, 3000, Identity("x", "x@else.test"), ORG, False, R.NOT_SHARED_WITH_USER),
    ("grant people, by email", POLICY, 3000, EVE, PEOPLE, True, R.SHARE_LINK),
    ("grant people, by group", POLICY, 3000, OPS, PEOPLE, True, R.SHARE_LINK),
    ("grant people, by name any case", POLICY, 3000, Identity("mallory"), PEOPLE, True, R.SHARE_LINK),
    ("grant people, someone else", POLICY, 3000, FRANK, PEOPLE, False, R.NOT_SHARED_WITH_USER),
    ("grant people, anonymous", POLICY, 3000, None, PEOPLE, False, R.USER_UNAUTHENTICATED),
    ("grant people, empty identity", POLICY, 3000, Identity(""), Grant("s7", "ws1", 3000, "people", ("",)), False,
     R.NOT_SHARED_WITH_USER),
    # the API keeps the people listed with an org link: they are no audience of it
    ("grant org, outsider listed in its people", POLICY, 3000, EVE, Grant("s8", "ws1", 3000, "org", ("eve@evil.test",)),
     False, R.NOT_SHARED_WITH_USER),
]


@pytest.mark.parametrize(("policy", "port", "identity", "grant", "allow", "reason"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_decide(policy: Policy, port: int | None, identity: Identity | None, grant: Grant | None, allow: bool,
                reason: Reason) -> None:
    decision = decide(policy, SPEC, port, identity, grant)
    assert (decision.allow, decision.reason) == (allow, reason)
    assert decision.rule, "every decision names the rule that made it"


PEOPLE_IN_THE_TABLE = sorted({case[3] for case in CASES if case[3] is not None}, key=repr)


@pytest.mark.parametrize("identity", PEOPLE_IN_THE_TABLE, ids=repr)
@pytest.mark.parametrize("port", [None, 3000, 4000, 5000, 8080, 22, 13337])
@pytest.mark.parametrize("grant", [None, ANYONE, ORG, PEOPLE, ANYONE_WS2])
def test_an_allowed_caller_is_a_member_exactly_when_the_decision_says_so(
        identity: Identity, port: int | None, grant: Grant | None) -> None:
    """The plan takes membership from an allowed decision's reason instead of asking again, so ``decide`` must
    ask it first: a member's access reads as owner or collaborator, never as public, org, admin or a link."""
    for policy in (POLICY, Policy(), TWO_CLAIMS):
        decision = decide(policy, SPEC, port, identity, grant)
        if decision.allow:
            assert (decision.reason if decision.reason in (R.OWNER, R.COLLABORATOR) else None) \
                == membership(SPEC, identity)


@pytest.mark.parametrize(("created", "allow", "reason"), [
    (99.0, False, R.SHARE_OTHER_TARGET),  # made for an earlier workspace of the same name
    (100.0, True, R.SHARE_LINK),
    (101.0, True, R.SHARE_LINK),
])
def test_a_share_link_made_before_the_workspace_began_opens_nothing(created: float, allow: bool,
                                                                     reason: Reason) -> None:
    """A name can pass to another owner with the old workspace's links left in the store (the local runtime): a
    link older than the workspace is another workspace's, for anyone it names."""
    since = dataclasses.replace(SPEC, since=100.0)
    for grant in (Grant("s1", "ws1", 3000, "anyone", created=created), Grant("s2", "ws1", None, "anyone",
                                                                               created=created)):
        decision = decide(POLICY, since, 3000, EVE, grant)
        assert (decision.allow, decision.reason) == (allow, reason)


@pytest.mark.parametrize(("port", "identity", "rule"), [
    (22, ALICE, "ports.denied lists 22"),
    (13337, ALICE, "the IDE port is only reachable at ide-{workspace}"),
    (3000, ALICE, "owner of the workspace"),
    (3000, BOB, "collaborator of the workspace"),
    (3000, ROOT, "policy admins"),
])
def test_a_decision_names_the_rule_that_made_it(port: int, identity: Identity, rule: str) -> None:
    """``codehub-gateway explain`` and the policy log print the rule: a port shut by ``ports.denied`` and the IDE
    port are shut by different rules, and an admin is let in by the admins list, not as a member."""
    assert decide(POLICY, SPEC, port, identity).rule == rule


@pytest.mark.parametrize(("org", "identity", "claims", "member"), [
    (Org(claims={"hd": "corp.test", "level": "3"}), Identity("ivan"), {"hd": "corp.test", "level": 3}, True),
    (Org(claims={"hd": "corp.test", "level": "3"}), Identity("ivan"), {"hd": "corp.test", "level": 4}, False),
    (Org(claims={"hd": "corp.test", "level": "3"}), Identity("ivan"), {"hd": "corp.test"}, False),
    (Org(claims={"hd": "corp.test"}), HOSTED, {"hd": "other.test"}, False),  # the claims given, not the identity's
    (Org(claims={"hd": "corp.test"}), OTHER_HOSTED, {"hd": "corp.test"}, True),
    (Org(claims={"verified": "true"}), Identity("ivan"), {"verified": True}, True),  # spelt as in JSON
    (Org(claims={"roles": "a"}), Identity("ivan"), {"roles": ["a"]}, False),  # a list is no one value
    (Org(), HOSTED, {"hd": "corp.test"}, False),  # no rules: nobody
])
def test_org_claim_rules_read_the_claims_given(org: Org, identity: Identity, claims: dict[str, object],
                                               member: bool) -> None:
    """Claim rules compare every listed claim, as text, with the claims handed in (an ID token's) when there are
    some, and the answer is a yes or a no."""
    assert is_org_member(org, identity, claims) is member


@pytest.mark.parametrize(("rules", "group", "allowed"), [
    (("team-*",), "team-a", True),
    (("team-*",), "team-", True),
    (("team-*",), "teams", False),  # the prefix is everything before the *, dash included
    (("team-*",), "team", False),
    (("qa",), "qa", True),
    (("qa",), "qa-leads", False),  # a name without * is a name, not a prefix
    (("qa", "team-*"), "team-b", True),
    ((), "qa", False),
])
def test_identity_group_rules_are_names_or_prefixes(rules: tuple[str, ...], group: str, allowed: bool) -> None:
    """Which group names may leave: ``team-*`` lets out ``team-a`` but not ``teams`` — a group someone else
    named, which happens to share the first letters."""
    identity = Identity("bob", groups=(group,))
    shown = IdentityRules(claims=("user", "groups"), groups=rules).disclose(identity)
    assert shown.groups == ((group,) if allowed else ())


def test_every_refusal_maps_to_its_status() -> None:
    for reason in Reason:
        error = denial(Decision(False, reason, "a rule"))
        assert error.status == (401 if reason is Reason.USER_UNAUTHENTICATED else 403)
        assert error.code == reason.value
        assert error.message


@pytest.mark.parametrize(("reason", "kind", "message"), [
    (R.USER_UNAUTHENTICATED, Unauthorized, "Sign in to see this page."),
    (R.WAKE_FROM_ELSEWHERE, AsleepElsewhere, "This workspace is asleep, and a page elsewhere may not wake it with "
                                              "your sign-in. Wake it yourself to see it here."),
    (R.NOT_ORG_MEMBER, Forbidden, "Your account is not admitted by this organisation's policy."),
    (R.NOT_SHARED_WITH_USER, Forbidden, "This page has not been shared with you. Ask its owner for access."),
    (R.PORT_DENIED, Forbidden, "This port may not be shared."),
    (R.IDE_OWNER_ONLY, Forbidden, "Only the workspace's owner and collaborators can open its IDE."),
    (R.SHARE_OTHER_TARGET, Forbidden, "This share link is for another port or workspace."),
    (R.WAKE_NOT_ALLOWED, Forbidden, "This workspace is asleep and only its owner or collaborators can wake it."),
    (R.CROSS_ORIGIN, Forbidden, "This request came from another origin and was refused: a page elsewhere may not "
                                "write or open a connection here with your sign-in."),
])
def test_a_refusal_tells_its_visitor_what_stopped_them(reason: Reason, kind: type[GatewayError],
                                                        message: str) -> None:
    """The message is the refused visitor's page; only a wake from elsewhere is the page whose button wakes the
    workspace (``AsleepElsewhere``): every other refusal would offer a button that cannot help."""
    error = denial(Decision(False, reason, "a rule"))
    assert (type(error), error.message) == (kind, message)


WAKE_OWNERS = Policy(wake=WakePolicy(who="owner-and-collaborators"))


@pytest.mark.parametrize(
    ("policy", "access", "allow", "reason"),
    [
        (Policy(), Decision(True, Reason.PUBLIC_PORT, "a rule"), True, Reason.PUBLIC_PORT),
        (Policy(), Decision(True, Reason.SHARE_LINK, "a rule"), True, Reason.SHARE_LINK),
        (Policy(), Decision(False, Reason.NOT_ORG_MEMBER, "a rule"), False, Reason.NOT_ORG_MEMBER),
        (WAKE_OWNERS, Decision(True, Reason.OWNER, "a rule"), True, Reason.OWNER),
        (WAKE_OWNERS, Decision(True, Reason.COLLABORATOR, "a rule"), True, Reason.COLLABORATOR),
        (WAKE_OWNERS, Decision(True, Reason.ADMIN, "a rule"), True, Reason.ADMIN),
        (WAKE_OWNERS, Decision(True, Reason.PUBLIC_PORT, "a rule"), False, Reason.WAKE_NOT_ALLOWED),
        (WAKE_OWNERS, Decision(True, Reason.ORG_MEMBER, "a rule"), False, Reason.WAKE_NOT_ALLOWED),
        (WAKE_OWNERS, Decision(True, Reason.SHARE_LINK, "a rule"), False, Reason.WAKE_NOT_ALLOWED),
        (WAKE_OWNERS, Decision(False, Reason.USER_UNAUTHENTICATED, "a rule"), False, Reason.WAKE_NOT_ALLOWED),
    ],
)
def test_may_wake(policy: Policy, access: Decision, allow: bool, reason: Reason) -> None:
    decision = may_wake(policy, access)
    assert (decision.allow, decision.reason) == (allow, reason)


def test_a_wake_refusal_names_the_rule_that_made_it() -> None:
    """The deny log line prints it: the visitor had access, and only the wake policy stopped them."""
    refused = may_wake(WAKE_OWNERS, Decision(True, Reason.PUBLIC_PORT, "port 5000 is public"))
    assert refused.rule == "only the owner and collaborators may wake this workspace"


FILE = "policies/team.yaml"
BAD_POLICIES = [
    # name, yaml, wantErr (substring)
    ("unknown section", "org: {}\nportz: {}\n", f"{FILE}:2: portz: unknown key"),
    ("unknown nested key", "ports:\n  default_visibility: org\n  visiblity: public\n",
     f"{FILE}:3: ports.visiblity: unknown key"),
    ("bad visibility", "ports:\n  default_visibility: secret\n",
     f"{FILE}:2: ports.default_visibility: Input should be 'private', 'org' or 'public'"),
    ("bad ceiling", "\n\nports:\n  max_visibility: everyone\n", f"{FILE}:4: ports.max_visibility:"),
    ("denied port out of range", "ports:\n  denied:\n    - 22\n    - 70000\n",
     f"{FILE}:4: ports.denied.1: Input should be less than or equal to 65535"),
    ("duration not a duration", "share_links:\n  max_ttl: forever\n",
     f"{FILE}:2: share_links.max_ttl: 'forever' is not a duration"),
    ("duration not positive", "share_links:\n  default_ttl: 0s\n",
     f"{FILE}:2: share_links.default_ttl: a duration must be a positive, finite number of seconds"),
    ("duration not finite", "share_links:\n  max_ttl: .inf\n",
     f"{FILE}:2: share_links.max_ttl: a duration must be a positive, finite number of seconds"),
    ("bad audience", "share_links:\n  audiences: [anyone, everybody]\n", f"{FILE}:2: share_links.audiences.1:"),
    ("default ttl above max", "share_links:\n  default_ttl: 30d\n  max_ttl: 7d\n",
     f"{FILE}:2: share_links.default_ttl: 2592000 s is longer than share_links.max_ttl"),
    ("default visibility above ceiling", "ports:\n  max_visibility: org\n  default_visibility: public\n",
     f"{FILE}:3: ports.default_visibility: 'public' is above ports.max_visibility 'org'"),
    ("bad wake rule", "wake:\n  who: everybody\n", f"{FILE}:2: wake.who:"),
    ("claim rule with a list", "org:\n  claims:\n    roles: [a, b]\n",
     f"{FILE}:3: org.claims.roles: a claim rule compares one text, number or true/false value"),
    ("groups not a list", "org:\n  groups: 7\n", f"{FILE}:2: org.groups:"),
    ("groups a mapping: the key's line", "org:\n  groups:\n    staff: yes\n", f"{FILE}:2: org.groups:"),
    ("two mistakes: the first is named", "ports:\n  default_visibility: secret\n  max_visibility: everyone\n",
     f"{FILE}:2: ports.default_visibility:"),
    ("a key YAML reads as null", "\n# no section\n~: 1\n", f"{FILE}:3: None:"),
    ("max ttl below the default ttl left out", "\nshare_links:\n  max_ttl: 1h\n",
     f"{FILE}:2: share_links.default_ttl: 86400 s is longer than share_links.max_ttl (3600 s)"),
    # an empty domain ('', a bare '@') would be the domain of no address (or of 'x@'); an address names no domain
    *[(f"org domain {domain!r}", f"org:\n  email_domains:\n    - corp.test\n    - {domain}\n",
       f"{FILE}:2: org.email_domains: {shown} is not an e-mail domain like corp.example.com")
      for domain, shown in [("''", "''"), ("'@'", "'@'"), ("alice@corp.test", "'alice@corp.test'"),
                            ("'corp test'", "'corp test'"), ("'@@corp.test'", "'@@corp.test'")]],
    ("frame ancestor not an origin", "embedding:\n  frame_ancestors:\n    - https://review.example\n"
     "    - javascript:alert(1)\n", f"{FILE}:2: embedding.frame_ancestors: 'javascript:alert(1)' is not an origin"),
    ("wildcard origin with credentials", "cors:\n  - ports: [3000]\n  - ports: [8000]\n    allow_origins: ['*']\n",
     f"{FILE}:4: cors.1.allow_origins: '*' admits every origin"),
    # 'null' is the Origin of sandboxed frames and data: pages, which any site can make: '*' by another name
    ("null origin with credentials", "cors:\n  - ports: [8000]\n    allow_origins: [same-workspace, 'null']\n",
     f"{FILE}:3: cors.0.allow_origins: 'null' is the origin of sandboxed frames and local files, which any site "
     "can make: with allow_credentials any site could read and write this port as its visitor. List the origins, or "
     "set allow_credentials: false"),
    # origins are compared as browsers send them: a typo or a path never matched, and nothing said so
    ("origin keyword misspelt", "cors:\n  - allow_origins: [same-workspaces]\n",
     f"{FILE}:2: cors.0.allow_origins: 'same-workspaces' is neither an origin like https://app.example.com nor "
     "same-workspace or same-owner"),
    ("origin with a path", "cors:\n  - allow_origins: ['https://app.example.com/']\n",
     f"{FILE}:2: cors.0.allow_origins: 'https://app.example.com/' is neither an origin"),
    ("origin in capitals", "cors:\n  - allow_origins: ['https://App.example.com']\n",
     f"{FILE}:2: cors.0.allow_origins: 'https://App.example.com' is neither an origin"),
    ("origin with a wildcard", "cors:\n  - allow_origins: ['https://*.example.com']\n",
     f"{FILE}:2: cors.0.allow_origins: 'https://*.example.com' is neither an origin"),
    # written into every answer of the port: a line break there made each one a 502 (unsafe-header)
    ("method with a line break", "cors:\n  - allow_methods: [GET, \"PUT\\r\\nX-Evil: 1\"]\n",
     f"{FILE}:2: cors.0.allow_methods: 'PUT\\r\\nX-Evil: 1' is not a method name"),
    ("header with a line break", "cors:\n  - allow_headers: [\"X-A\\nX-B: 1\"]\n",
     f"{FILE}:2: cors.0.allow_headers: 'X-A\\nX-B: 1' is not a header name"),
    ("exposed headers in one text", "cors:\n  - expose_headers: ['X-Total, X-Page']\n",
     f"{FILE}:2: cors.0.expose_headers: 'X-Total, X-Page' is not a header name"),
    # unlike allow_headers, the methods are written as they are: with credentials a browser reads '*' as a method
    # of that name, and the port's writes from the listed origins failed their preflight with nothing said
    ("method wildcard", "cors:\n  - allow_methods: ['*']\n",
     f"{FILE}:2: cors.0.allow_methods: '*' is not a method name"),
    ("no workspace at all", "workspaces:\n  most_per_person: 0\n",
     f"{FILE}:2: workspaces.most_per_person: Input should be greater than or equal to 1"),
    ("workspaces in words", "workspaces:\n  most_per_person: many\n", f"{FILE}:2: workspaces.most_per_person"),
    ("not a mapping", "- org\n- ports\n", f"{FILE}:1: a policy must be a mapping"),
    # the parser's own words for the fault, not its context (which repeats the line and names "<unicode string>")
    ("not YAML", "ports:\n  denied: [22\n", f"{FILE}:3: not valid YAML: did not find expected ',' or ']'"),
    ("tab indentation", "ports:\n\tdenied: []\n",
     f"{FILE}:2: not valid YAML: found character that cannot start any token"),
]


@pytest.mark.parametrize(("text", "want_err"), [case[1:] for case in BAD_POLICIES],
                         ids=[case[0] for case in BAD_POLICIES])
def test_bad_policy_is_rejected_with_file_and_line(text: str, want_err: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, FILE)
    assert want_err in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Policy()),
        ("share_links:\n  default_ttl: 90\n", Policy.model_validate({"share_links": {"default_ttl": 90}})),
        ("org:\n  claims:\n    email_verified: true\n    level: 3\n",
         Policy(org=Org(claims={"email_verified": "true", "level": "3"}))),
        # a ceiling or a maximum may be met, only not passed
        ("ports:\n  default_visibility: org\n  max_visibility: org\n",
         Policy(ports=Ports(default_visibility="org", max_visibility="org"))),
        ("share_links:\n  default_ttl: 7d\n  max_ttl: 7d\n",
         Policy.model_validate({"share_links": {"default_ttl": 7 * 86400, "max_ttl": 7 * 86400}})),
        ("workspaces:\n  most_per_person: 1\n", Policy.model_validate({"workspaces": {"most_per_person": 1}})),
        # '*' is refused only together with credentials, and so is 'null'
        ("cors:\n  - allow_origins: ['*']\n    allow_credentials: false\n",
         Policy(cors=(CorsRule(allow_origins=("*",), allow_credentials=False),))),
        ("cors:\n  - allow_origins: ['null']\n    allow_credentials: false\n",
         Policy(cors=(CorsRule(allow_origins=("null",), allow_credentials=False),))),
        ("cors:\n  - allow_origins: [same-workspace, same-owner, 'https://app.example.com', 'http://[::1]:3000',\n"
         "                    'http://localhost:5173', 'chrome-extension://abcdef']\n"
         "    allow_methods: [GET, POST]\n    allow_headers: ['*']\n    expose_headers: [X-Total-Count]\n",
         Policy(cors=(CorsRule(allow_origins=("same-workspace", "same-owner", "https://app.example.com",
                                              "http://[::1]:3000", "http://localhost:5173", "chrome-extension://abcdef"),
                               allow_methods=("GET", "POST"), expose_headers=("X-Total-Count",)),))),
    ],
)
def test_good_policies_parse(text: str, expected: Policy) -> None:
    assert parse_policy(text, FILE) == expected


def test_duration_units() -> None:
    policy = parse_policy("share_links:\n  default_ttl: 90s\n  max_ttl: 2w\nwake:\n  warm_timeout: 1.5m\n")
    assert (policy.share_links.default_ttl, policy.share_links.max_ttl) == (90, 14 * 86400)
    assert policy.wake.warm_timeout == 90


@pytest.mark.parametrize(("value", "seconds"), [
    (1, 1), ("1s", 1), (0.5, 0.5), ("0.5s", 0.5), ("90", 90), (" 15 m ", 900), ("2h", 7200), ("1d", 86400),
    ("1w", 604800),
])
def test_durations_read_as_seconds(value: object, seconds: float) -> None:
    """Any positive duration is one, a second or less too."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, "0s", -1, True, float("nan"), float("inf"), 10**400, "1y", "", None])
def test_what_is_no_duration(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(("seconds", "text"), [
    (1, "1 second"), (1.5, "1.5 seconds"), (59.9996, "59.9996 seconds"), (0.0004, "0.0004 seconds"),
    (59, "59 seconds"), (60, "1 minute"), (61, "61 seconds"), (120, "2 minutes"), (3600, "1 hour"),
    (5400, "90 minutes"), (7200, "2 hours"), (86400, "1 day"), (90000, "25 hours"), (172800, "2 days"),
    (604800, "7 days"),
])
def test_durations_are_described_in_the_largest_whole_unit(seconds: float, text: str) -> None:
    """A refused share link's TTL is answered in the unit people use: ``90d`` in days, ``36h`` in hours."""
    assert describe_duration(seconds) == text


def test_shipped_default_policy_is_the_built_in_default() -> None:
    assert load_policy(REPO / "policies" / "default.yaml") == Policy()


def test_shipped_default_policy_documents_every_key() -> None:
    text = (REPO / "policies" / "default.yaml").read_text()

    def keys(model: type[object], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            out.append(prefix + name)
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                out.extend(keys(annotation, prefix + name + "."))
        return out

    for key in keys(Policy):
        assert f"{key.rpartition('.')[2]}:" in text, f"policies/default.yaml does not document {key}"


@pytest.mark.parametrize("name", ["strict.yaml", "open-org.yaml"])
def test_shipped_examples_load(name: str) -> None:
    policy = load_policy(REPO / "policies" / "examples" / name)
    assert policy != Policy()


def test_strict_example_means_what_it_says() -> None:
    strict = load_policy(REPO / "policies" / "examples" / "strict.yaml")
    public = WorkspaceSpec(id="ws1", owner="alice", ports={5000: "public", 5432: "public"})
    assert decide(strict, public, 5000, None) == Decision(False, Reason.USER_UNAUTHENTICATED, "port 5000 is org")
    assert decide(strict, public, 5432, ALICE).reason is Reason.PORT_DENIED
    open_org = load_policy(REPO / "policies" / "examples" / "open-org.yaml")
    assert decide(open_org, public, 8080, Identity("x", "x@corp.example")).reason is Reason.ORG_MEMBER


def _write(path: Path, text: str, stamp: int) -> None:
    path.write_text(text)
    os.utime(path, (stamp, stamp))


def test_reload_keeps_the_last_good_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, "ports:\n  denied: [22]\n", 1_000)
    holder = PolicyHolder(path)
    assert holder.current.ports.denied == (22,)
    assert holder.reload_if_changed() is False  # unchanged

    _write(path, "ports:\n  denied: [22, 5432]\n  max_visibility: org\n  default_visibility: public\n", 2_000)
    assert holder.reload_if_changed() is False
    assert holder.current.ports.denied == (22,)
    assert holder.last_error is not None
    assert f"{path}:4: ports.default_visibility" in holder.last_error
    assert "keeping the previous one" in caplog.text

    _write(path, "ports:\n  denied: [22, 5432]\n", 3_000)
    assert holder.reload_if_changed() is True
    assert list(holder.current.ports.denied) == [22, 5432]
    assert holder.last_error is None

    path.unlink()
    assert holder.reload_if_changed() is False
    assert list(holder.current.ports.denied) == [22, 5432]


def test_a_policy_file_is_read_once_per_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reload reads the file when it changed, not on every later check; a file gone for a moment (replaced by
    an editor or a ConfigMap update) is no error and changes nothing."""
    path = tmp_path / "policy.yaml"
    _write(path, "ports:\n  denied: [22]\n", 1_000)
    holder = PolicyHolder(path)
    assert holder.last_error is None
    _write(path, "ports:\n  denied: [2222]\n", 2_000)
    with caplog.at_level(logging.INFO, logger="gateway.edge.policy"):
        assert holder.reload_if_changed() is True
    assert f"policy reloaded from {path}" in caplog.text
    assert holder.reload_if_changed() is False
    path.unlink()
    assert holder.reload_if_changed() is False
    assert holder.last_error is None
    assert holder.current.ports.denied == (2222,)
    builtin = PolicyHolder(None)
    assert (builtin.current, builtin.last_error, builtin.reload_if_changed()) == (Policy(), None, False)


def test_bad_policy_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("ports:\n  denied: [ssh]\n")
    with pytest.raises(PolicyError, match=rf"{path}:2: ports.denied.0:"):
        PolicyHolder(path)
    with pytest.raises(PolicyError) as caught:
        PolicyHolder(tmp_path / "missing.yaml")
    assert str(caught.value) == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"


def test_a_reload_of_a_file_that_is_not_text_keeps_the_last_good_policy(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are one more bad policy, named in one line: no exception the reload does not
    expect escapes it."""
    path = tmp_path / "policy.yaml"
    _write(path, "ports:\n  denied: [22]\n", 1_000)
    holder = PolicyHolder(path)
    path.write_bytes(b"ports:\n  denied: [\xff]\n")
    os.utime(path, (2_000, 2_000))
    assert holder.reload_if_changed() is False
    assert (holder.current.ports.denied, holder.last_error) == (
        (22,), f"{path}: not UTF-8 text (invalid start byte at byte 18)")


@pytest.mark.parametrize(("identity", "principal", "matches"), [
    (Identity("alice"), "alice", True),
    (Identity("alice"), " alice ", True),
    (Identity("alice"), "ALICE", True),  # names and e-mails: case-insensitive
    (Identity("\u212aate"), "kate", False),  # KELVIN SIGN, which str.lower() makes a k
    (Identity("x", "Alice@Corp.Example"), "alice@corp.example", True),
    (Identity("x", "\u212aate@corp.example"), "kate@corp.example", False),  # ... in ASCII only
    (Identity("alice@corp.example", "mallory@x.example"), "alice@corp.example", False),  # a user name that looks
    (Identity("x", groups=("qa",)), "group:qa", True),  # like an address is no address
    (Identity("x", "alice@corp.example"), " alice@corp.example ", True),  # spaces around any principal
    (Identity("x", groups=("qa",)), " group:qa", True),
    (Identity("x", groups=("qa",)), "group:QA", False),
    (Identity("group:qa"), "group:qa", False),
    (Identity(""), "", False),
])
def test_principals_match_as_the_policy_file_says(identity: Identity, principal: str, matches: bool) -> None:
    """A user name or an e-mail, case-insensitively in ASCII only (letters that fold to ASCII, like the Kelvin
    sign, would let a chosen user name or address pass for another), or ``group:NAME``."""
    assert identity.matches(principal) is matches


@pytest.mark.parametrize(("groups", "expected"), [
    (["dev", "qa"], ("dev", "qa")), ("dev", ("dev",)), ([1, 2], ("1", "2")), (5, ("5",)), (None, ()),
    ({"dev": True}, ()), ([["nested"], "qa"], ("qa",)),
])
def test_any_groups_claim_makes_an_identity(groups: object, expected: tuple[str, ...]) -> None:
    """An IdP's groups claim of another shape (a number, an object) raised TypeError: a 500 at sign-in."""
    assert Identity.from_id_token({"sub": "alice", "groups": groups}).groups == expected


@pytest.mark.parametrize(("identity", "owner", "is_owner"), [
    (Identity("alice"), "alice", True),
    (Identity("Alice"), "alice", True),
    (Identity("alice"), " alice ", True),
    (Identity("bob", "bob@example.com"), "bob@example.com", False),  # a workspace made by a user named
    (Identity("bob@example.com"), "bob@example.com", True),  # "bob@example.com" is theirs, not bob's
    (Identity("x", groups=("qa",)), "group:qa", False),
    (Identity(""), "", False),
])
def test_the_owner_is_a_user_name_never_an_address_or_a_group(identity: Identity, owner: str,
                                                             is_owner: bool) -> None:
    """A workspace's owner is who made it (their user name), not a principal: read as one, a workspace made by
    someone whose chosen user name is bob's address had bob for its owner, and bob's identity went to its apps
    unasked."""
    spec = WorkspaceSpec(id="ws", owner=owner)
    assert (membership(spec, identity) is Reason.OWNER) is is_owner


def test_an_unverified_address_is_no_user_name() -> None:
    """With ``username_claim: email``, an address the IdP has not verified (anyone can type any) went out as the
    user name, in ``X-Forwarded-User`` and against principals: sign-in refuses it instead."""
    claims = {"sub": "u1", "email": "bob@corp.example", "email_verified": False}
    unverified = Identity.from_id_token(claims, subject_claim="email")
    assert (unverified.subject, unverified.email) == ("", "")
    assert unverified.unsendable() is not None
    verified = Identity.from_id_token({**claims, "email_verified": True}, subject_claim="email")
    assert verified.subject == "bob@corp.example"
    assert verified.unsendable() is None
    assert Identity.from_id_token(claims).subject == "u1", "the IdP's own subject needs no verified address"


@pytest.mark.parametrize(("said", "verified"), [
    (True, True), ("true", True), ("True", True),
    (False, False), ("false", False), ("False", False), ("", False), ("no", False), (None, False), (0, False),
])
def test_only_a_yes_verifies_an_address(said: object, verified: bool) -> None:
    """Some IdPs (Cognito, Apple, JumpCloud) send ``email_verified`` as text: their ``"false"`` is not a yes, nor is
    anything else but ``true``. Taken for verified, an address anyone can type in matched whoever it names."""
    claims = {"sub": "u1", "email": "bob@corp.example", "email_verified": said}
    identity = Identity.from_id_token(claims)
    assert identity.email == ("bob@corp.example" if verified else "")
    assert identity.matches("bob@corp.example") is verified
    by_address = Identity.from_id_token(claims, subject_claim="email")
    assert by_address.subject == ("bob@corp.example" if verified else "")
    assert (by_address.unsendable() is None) is verified


@pytest.mark.parametrize("username_claim", ["preferred_username", "email"])
def test_a_token_without_the_user_name_claim_names_nobody(username_claim: str) -> None:
    """A token without the configured ``username_claim`` was named by its ``sub``, a value of another namespace
    than everyone else's user name: someone free to choose their user name at the IdP could choose another
    person's ``sub`` and be taken for them (owner of their workspaces, their collaborator entries, their
    consents). An address that is absent is refused like one the IdP has not verified."""
    identity = Identity.from_id_token({"sub": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "name": "Victim"},
                                      subject_claim=username_claim)
    assert identity.subject == ""
    assert identity.unsendable() == "no user name (the claim it is read from is missing, or an unverified e-mail)"


BOBBY = (("preferred_username", "bobby"),)


@pytest.mark.parametrize(("claims", "expected"), [
    ({"sub": "u1", "email": "bob@corp.example"}, Identity("u1", "bob@corp.example")),  # no email_verified: trusted
    ({"sub": "u1", "name": "Bob", "preferred_username": "bobby"}, Identity("u1", name="Bob", attributes=BOBBY)),
    ({"sub": "u1", "preferred_username": "bobby"}, Identity("u1", name="bobby", attributes=BOBBY)),  # its name
    ({"email": "bob@corp.example"}, Identity("", "bob@corp.example")),  # no user name: sign-in refuses it
])
def test_an_id_token_makes_the_identity_its_claims_say(claims: dict[str, object], expected: Identity) -> None:
    """The fields apps and policies see, from the usual shapes of ID token: an address is used unless the IdP
    says it is unverified, and a token without a user name makes an identity sign-in refuses."""
    identity = Identity.from_id_token(claims)
    assert identity == expected
    assert (identity.unsendable() is None) is bool(expected.subject)


def test_only_what_the_idp_says_of_the_person_rides_along_for_claim_rules() -> None:
    """The IdP's other claims ride along in the session for org rules on claims; claims about the token itself
    (issuer, audience, times, nonces, hashes, session ids) and those with a field of their own do not, even when
    they are plain text a rule could compare: they would only fill the cookie, or let a rule match what is not a
    fact about the person."""
    about_the_token = {
        "iss": "https://idp.example", "sub": "u1", "aud": "codehub", "exp": 2, "nbf": 1, "iat": 1, "jti": "j1",
        "nonce": "n1", "auth_time": 1, "at_hash": "h1", "c_hash": "h2", "s_hash": "h3", "azp": "codehub",
        "acr": "mfa", "amr": "pwd", "sid": "s1", "typ": "ID", "state": "st", "attrs": "a", "cnf": "k",
        "updated_at": 3, "email": "bob@corp.example", "groups": "admins", "name": "Bob",
    }
    claims = {**about_the_token, "preferred_username": "bob", "roles": "qa", "department": ["legal", "hr"],
              "hd": "corp.example", "level": 3, "staff": True}
    identity = Identity.from_id_token(claims, subject_claim="preferred_username", groups_claim="roles")
    assert (identity.subject, identity.email, identity.groups, identity.name) == (
        "bob", "bob@corp.example", ("qa",), "Bob")
    assert identity.attributes == (("hd", "corp.example"), ("level", "3"), ("staff", "true"))
    assert is_org_member(Org(claims={"level": "3"}), identity)
    assert not is_org_member(Org(claims={"acr": "mfa"}), identity)


@pytest.mark.parametrize(("size", "kept"), [(1017, True), (1018, False)])
def test_the_claims_that_ride_along_fit_a_budget(size: int, kept: bool) -> None:
    """At most 1 KiB of them, counting each claim's name, its value and 6 characters of JSON around them: a claim
    past that is left out (its org rules do not match), and so is every claim after it."""
    identity = Identity.from_id_token({"sub": "u1", "a": "x" * size, "b": "1"})
    assert [name for name, _ in identity.attributes] == (["a"] if kept else [])
    assert is_org_member(Org(claims={"a": "x" * size}), identity) is kept


@pytest.mark.parametrize(("identity", "reason"), [
    (Identity(""), "no user name (the claim it is read from is missing, or an unverified e-mail)"),
    (Identity("eve\n"), "a user name with control characters"),
    (Identity("eve", "eve@x.test\r"), "an e-mail with control characters"),
    (Identity("eve", name="Eve\x1b[31m"), "a name with control characters"),
    (Identity("eve", groups=("ops", "adm\x00ins")), "a group name with control characters"),
    (Identity("eve", groups=("ops", "admins,ops")), "a group name with a comma, which apps would read as two groups"),
    # printable-looking, and someone else's name on the hub: a word joiner, a right-to-left override
    (Identity("alice\u2060"), "a user name with invisible or direction-changing characters"),
    (Identity("\u202eecila"), "a user name with invisible or direction-changing characters"),
    (Identity("eve", "eve@x.test", ("ops", "dev"), "Eve"), None),
])
def test_sign_in_says_which_value_it_cannot_pass_to_apps(identity: Identity, reason: str | None) -> None:
    """Sign-in shows the reason (``The sign-in service sent ...``): one bad group among good ones is enough."""
    assert identity.unsendable() == reason


@pytest.mark.parametrize(("text", "want_err"), [
    ("ports:\n  denied: [0]\n", f"{FILE}:2: ports.denied.0: Input should be greater than or equal to 1"),
    ("cors:\n  - ports: [0]\n", f"{FILE}:2: cors.0.ports.0: Input should be greater than or equal to 1"),
    ("cors:\n  - ports: [65536]\n", f"{FILE}:2: cors.0.ports.0: Input should be less than or equal to 65535"),
    ("cors:\n  - max_age: -1\n", f"{FILE}:2: cors.0.max_age: Input should be greater than or equal to 0"),
    ("cors:\n  - max_age: 86401\n", f"{FILE}:2: cors.0.max_age: Input should be less than or equal to 86400"),
])
def test_numbers_out_of_range_are_refused(text: str, want_err: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, FILE)
    assert want_err in str(caught.value)


def test_numbers_at_the_ends_of_their_ranges_are_taken() -> None:
    policy = parse_policy("ports:\n  denied: [1, 65535]\ncors:\n  - ports: [1, 65535]\n    max_age: 0\n"
                          "  - ports: [2]\n    max_age: 86400\nidentity:\n  claims: [user, email, name, groups]\n")
    assert policy.ports.denied == (1, 65535)
    assert [(rule.ports, rule.max_age) for rule in policy.cors] == [((1, 65535), 0), ((2,), 86400)]
    assert policy.identity.claims == ("user", "email", "name", "groups")


_PERSON = Identity("bob", "bob@example.com", ("qa",), "Bob B", (("hd", "corp.test"),))


@pytest.mark.parametrize(("claims", "shown"), [
    (("user", "email", "name", "groups"), Identity("bob", "bob@example.com", ("qa",), "Bob B")),
    (("user",), Identity("bob")),
    (("email",), Identity("", "bob@example.com")),
    (("name",), Identity("", "", (), "Bob B")),
    (("groups",), Identity("", "", ("qa",))),
    ((), Identity("")),
])
def test_an_app_learns_only_the_claims_the_policy_lets_leave(claims: tuple[str, ...], shown: Identity) -> None:
    """A claim withheld is empty (so no header carries it), and the IdP's other claims never leave."""
    assert IdentityRules(claims=claims, groups=("qa",)).disclose(_PERSON) == shown  # type: ignore[arg-type]


def test_the_reasons_are_the_words_clients_logs_and_metrics_see() -> None:
    """Error codes, the policy log, metrics labels and ``explain`` all print them: a closed list, spelt so."""
    assert {reason.name: reason.value for reason in Reason} == {
        "OWNER": "owner", "COLLABORATOR": "collaborator", "ADMIN": "admin", "PUBLIC_PORT": "public-port",
        "ORG_MEMBER": "org-member", "SHARE_LINK": "share-link", "USER_UNAUTHENTICATED": "user-unauthenticated",
        "NOT_ORG_MEMBER": "not-org-member", "NOT_SHARED_WITH_USER": "not-shared-with-user",
        "PORT_DENIED": "port-denied", "IDE_OWNER_ONLY": "ide-owner-only", "SHARE_OTHER_TARGET": "share-other-target",
        "WAKE_NOT_ALLOWED": "wake-not-allowed", "CROSS_ORIGIN": "cross-origin-request",
        "WAKE_FROM_ELSEWHERE": "wake-from-elsewhere",
    }


@pytest.mark.parametrize("value", ["x", "[a, b]"])
def test_a_claim_rule_keyed_by_a_number_names_its_line(value: str) -> None:
    """The error's place ends in ``[key]``, a name, though the key's value may be a list, which is read by
    position: the place was followed into the list and the policy check crashed."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(f"org:\n  claims:\n    1: {value}\n", FILE)
    assert f"{FILE}:3: org.claims.1.[key]: Input should be a valid string" in str(caught.value)


@pytest.mark.parametrize("domain", ["corp.test", "@corp.test", "CORP.test"])
def test_an_org_domain_may_be_written_with_its_at_sign(domain: str) -> None:
    org = Org(email_domains=(domain,))
    assert is_org_member(org, Identity("frank", "frank@corp.test"))
    assert not is_org_member(org, Identity("fred", "fred@evilcorp.test"))


@pytest.mark.parametrize(("port", "identity", "grant", "rule"), [
    (None, None, None, "the IDE needs sign-in"),
    (None, Identity("alice"), None, "owner and collaborators use the IDE"),
    (None, Identity("eve"), None, "the IDE is only for its owner and collaborators"),
    (3000, None, Grant("s1", "ws1", 3000, "anyone"), "share link for anyone holding it"),
    (3000, Identity("frank", "frank@corp.test"), Grant("s2", "ws1", 3000, "org"),
     "share link for signed-in org members"),
    (3000, Identity("eve"), Grant("s3", "ws1", 3000, "people", ("eve",)), "share link for named people"),
    (3000, Identity("mallory"), Grant("s3", "ws1", 3000, "people", ("eve",)), "the share link names other people"),
    (3000, None, Grant("s3", "ws1", 3000, "people", ("eve",)), "the share link is for people members"),
    (3000, None, Grant("s4", "ws2", 3000, "anyone"), "the share link is for another port or workspace"),
    (3000, Identity("eve"), None, "port 3000 is private to the owner and collaborators"),
    (4000, None, None, "port 4000 is org"),
    (4000, Identity("eve"), None, "the org policy does not admit this user"),
    (4000, Identity("frank", "frank@corp.test"), None, "port 4000 is visible to the org"),
    (5000, None, None, "port 5000 is public"),
])
def test_explain_names_the_rule_of_every_decision(port: int | None, identity: Identity | None, grant: Grant | None,
                                                  rule: str) -> None:
    policy = Policy(org=Org(email_domains=("corp.test",)))
    spec = WorkspaceSpec(id="ws1", owner="alice", ports={3000: "private", 4000: "org", 5000: "public"})
    assert decide(policy, spec, port, identity, grant).rule == rule
