"""Every route of the web UI x every role x every method, with hostile values; and every POST without its
CSRF token. Shared by tests/test_web_matrix.py and bench/web_matrix.py (which prints the table).

Values go into the path (each argument of the rule), the query string and the form (every parameter
name a view reads); a route answers 5xx nowhere. A POST without a CSRF token is 400 and changes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask
from flask.testing import FlaskClient

from appliance.store.database import open_database
from tests.web_helpers import PASSWORDS, csrf

# role -> the account of tests/web_helpers.py (None: not signed in)
ROLES = {"anonymous": None, "technician": "tech", "radiologist": "rad", "admin": "admin"}
# each role's browser comes from its own address, so one role's wrong passwords never throttle another's
ADDRESSES = {"anonymous": "10.8.0.1", "technician": "10.8.0.2", "radiologist": "10.8.0.3", "admin": "10.8.0.4"}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
HOSTILE = ["9223372036854775808", "-9223372036854775809", "-1", "0", "1e309", "abc", "\r\nX-Injected: 1",
           "/\t/evil.example", "//evil.example", "javascript:alert(1)", "../../../etc/passwd", "' OR '1'='1",
           "<script>alert(1)</script>", "\u202eé漢字\U0001f600", "\x00", "", "9" * 5000]
# every request parameter a view reads, given the hostile value at once in the query and in the form
PARAMETERS = ("page", "next", "q", "status", "flagged", "unreviewed", "from", "to", "study", "upload_id", "final",
              "result_id", "decision", "comment", "action", "username", "password", "current", "confirm", "role",
              "disabled", "name", "value", "month", "destination", "lang", "dicom_ae_title", "dicom_port",
              "dicom_allowed_callers", "pacs_destinations", "outbox_id", "recall", "outcome", "detail")
ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


@dataclasses.dataclass(frozen=True)
class Outcome:
    rule: str
    role: str
    method: str
    url: str
    status: int


@dataclasses.dataclass
class Matrix:
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    csrf_refused: list[Outcome] = dataclasses.field(default_factory=list)
    csrf_missed: list[Outcome] = dataclasses.field(default_factory=list)  # POST without token not refused
    state_changed: bool = False

    @property
    def routes(self) -> int:
        return len({o.rule for o in self.outcomes})

    @property
    def server_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes + self.csrf_refused + self.csrf_missed if o.status >= 500]

    def summary(self) -> str:
        post_routes = len({o.rule for o in self.csrf_refused + self.csrf_missed})
        return (f"web matrix: {self.routes} routes x {len(ROLES)} roles x {len(METHODS)} methods, "
                f"{len(self.outcomes)} requests with hostile values, {len(self.server_errors)} 5xx; "
                f"CSRF: {post_routes} POST routes x {len(ROLES)} roles, "
                f"{len(self.csrf_refused)}/{len(self.csrf_refused) + len(self.csrf_missed)} POSTs without a token "
                f"refused with 400, state {'CHANGED' if self.state_changed else 'unchanged'}")

    def table(self) -> str:
        """One line per route and method: the status codes each role got (count), and the 5xx seen."""
        cells: dict[tuple[str, str], dict[str, collections.Counter]] = collections.defaultdict(
            lambda: collections.defaultdict(collections.Counter))
        for o in self.outcomes:
            cells[(o.rule, o.method)][o.role][o.status] += 1
        def cell(counts: collections.Counter) -> str:
            return " ".join(f"{status}x{n}" for status, n in sorted(counts.items()))

        width = max(len(f"{m} {r}") for r, m in cells) + 2
        column = max(len(cell(c)) for by_role in cells.values() for c in by_role.values()) + 2
        lines = [f"{'route':<{width}}" + "".join(f"{role:<{column}}" for role in ROLES) + "5xx"]
        for (rule, method), by_role in sorted(cells.items()):
            row = f"{method + ' ' + rule:<{width}}" + "".join(f"{cell(by_role[role]):<{column}}" for role in ROLES)
            lines.append(row + str(sum(n for c in by_role.values() for s, n in c.items() if s >= 500)))
        return "\n".join(lines)


def _signed_in(app: Flask, role: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = ADDRESSES[role]
    account = ROLES[role]
    if account is not None:
        response = client.post("/login", data={"username": account, "password": PASSWORDS[account],
                                                "csrf_token": csrf(client)})
        assert response.status_code == 302, f"{role} could not sign in: {response.status_code}"
    return client


def _real_arguments(home: Path) -> dict[str, str]:
    """Path arguments that exist in this data directory, so a request reaches past the 404 of its route."""
    db = open_database(home)
    try:
        def first(sql: str, default: str) -> str:
            row = db.execute(sql).fetchone()
            return str(row[0]) if row else default
        return {"study": first("SELECT study_instance_uid FROM studies", "1.2.3"),
                "series": first("SELECT series_instance_uid FROM series", "1.2.3.4"),
                "result_id": first("SELECT id FROM results ORDER BY id", "1"),
                "row_id": first("SELECT id FROM quarantine ORDER BY id", "1"),
                "recall_id": first("SELECT id FROM recalls ORDER BY id", "1"),
                "model": first("SELECT model FROM results ORDER BY id", "chest-covid19"),
                "model_id": first("SELECT model FROM results ORDER BY id", "chest-covid19"),
                "n": "0", "k": "0", "count": "4", "plane": "coronal", "filename": "app.css"}
    finally:
        db.conn.close()


def _url(rule: str, value: str | None, real: dict[str, str]) -> str:
    """The rule with each argument given ``value`` (quoted), or, when None, a real one."""
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if value is not None:
            return quote(value, safe="")
        if name == "uid":
            return real["series"] if rule.startswith("/series/") else real["study"]
        return real[name]
    return ARGUMENT.sub(fill, rule)


def _requests(rule: str, methods: set[str], real: dict[str, str]) -> Iterator[tuple[str, str, str]]:
    """(method, url, hostile value) for one rule: each hostile value in the parameters, with real path
    arguments and, for a rule with arguments, in the path too; one request per method the rule refuses."""
    has_arguments = bool(ARGUMENT.search(rule))
    for method in METHODS:
        if method not in methods:
            yield method, _url(rule, None, real), HOSTILE[0]
            continue
        for value in HOSTILE:
            yield method, _url(rule, None, real), value
            if has_arguments:
                yield method, _url(rule, value, real), value


def _token(client: FlaskClient) -> str:
    """The CSRF token of this client's session (cached on the client; the session keeps it)."""
    if "csrf" not in client.__dict__:
        client.__dict__["csrf"] = csrf(client, "/login")
    return client.__dict__["csrf"]


def _state(home: Path) -> str:
    """A digest of everything a request could change: the whole database and the settings file."""
    db = open_database(home)
    try:
        dump = "\n".join(db.conn.iterdump())
    finally:
        db.conn.close()
    toml = home / "appliance.toml"
    extra = toml.read_text() if toml.exists() else ""
    return hashlib.sha256((dump + extra + json.dumps(sorted(p.name for p in home.iterdir()))).encode()).hexdigest()


def csrf_phase(app: Flask, home: Path, matrix: Matrix) -> None:
    """Every POST route x role without a CSRF token: 400, and the database and settings unchanged."""
    clients = {role: _signed_in(app, role) for role in ROLES}
    real = _real_arguments(home)
    before = _state(home)
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if "POST" not in rule.methods:
            continue
        for role, client in clients.items():
            url = _url(rule.rule, None, real)
            response = client.post(url, data={"username": ROLES["admin"], "password": PASSWORDS["admin"],
                                               "action": "change", "role": "technician", "disabled": "1",
                                               "name": "site_name", "value": "changed", "lang": "fr"})
            outcome = Outcome(rule.rule, role, "POST", url, response.status_code)
            (matrix.csrf_refused if response.status_code == 400 else matrix.csrf_missed).append(outcome)
    matrix.state_changed = _state(home) != before


def hostile_phase(app: Flask, home: Path, matrix: Matrix) -> None:
    """Every route x role x method with each hostile value; the outcomes go into ``matrix``."""
    real = _real_arguments(home)
    clients = {role: _signed_in(app, role) for role in ROLES}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        for role, account in ROLES.items():
            for method, url, value in _requests(rule.rule, rule.methods, real):
                client = clients[role]
                params = dict.fromkeys(PARAMETERS, value)
                kwargs: dict[str, Any] = {"method": method, "query_string": params}
                if method != "GET":
                    kwargs["data"] = {**params, "csrf_token": _token(client)}
                status = client.open(url, **kwargs).status_code
                matrix.outcomes.append(Outcome(rule.rule, role, method, url, status))
                if rule.endpoint == "auth.logout" and method == "POST" and account:
                    clients[role] = _signed_in(app, role)  # signed out (everywhere): a new session


def run_matrix(app: Flask, home: Path) -> Matrix:
    """The CSRF phase first (on the untouched data directory), then the hostile values."""
    matrix = Matrix()
    csrf_phase(app, home, matrix)
    hostile_phase(app, home, matrix)
    return matrix
