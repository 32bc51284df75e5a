"""The console's parts without a stack: the live log's reading, who is an admin, CSRF and origin checks, and the
actions' audit log. The page itself, through the real chain, is tests/browser/test_console.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.requests import Request

from controller.console import auth
from controller.console.actions import ActionError, Actions, Audit
from controller.console.live import MAX_BYTES, STALE_S, LiveLog
from controller.console.snapshot import Collector
from controller.gateway.keystore import KeyStore
from controller.plan import make_plan
from controller.render.envoy import worker_cluster
from controller.spec import load_spec
from controller.spec.models import Fleet


def line(kind: str, rid: str = "r1", **fields: Any) -> str:
    base = {"type": kind, "request_id": rid, "time": "1796248393.935", "user": "alice", "model": "m", "stream": "1"}
    return json.dumps({**base, **fields}) + "\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_live_log_shows_a_request_while_it_runs_and_after(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    path.write_text(line("DownstreamPeriodic", "before"))  # from before the console started: not replayed
    clock = Clock()
    log = LiveLog(path, lambda up: "w1" if up == "127.0.0.1:9" else None, clock)
    log.refresh()
    with path.open("a") as f:
        f.write(line("DownstreamPeriodic", ms="1000", upstream="127.0.0.1:9"))  # no byte back yet
    log.refresh()
    (row,) = log.view()["in_flight"]
    assert row["phase"] == "prefill" and row["worker"] == "w1" and row["user"] == "alice"
    with path.open("a") as f:
        f.write(line("DownstreamPeriodic", ms="3000", ttfb_ms="1000", events="40", upstream="127.0.0.1:9"))
        f.write('{"type": "DownstreamPeri')  # torn: the rest comes with the next write
    log.refresh()
    (row,) = log.view()["in_flight"]
    assert (row["phase"], row["tokens"], row["tokens_per_s"]) == ("generating", 40, 20.0)
    with path.open("a") as f:  # its end: out of flight; its row in `recent` comes from the usage log
        f.write('odic"}\n' + line("DownstreamEnd", status="200", ms="4000", prompt_tokens="3", completion_tokens="60"))
    log.refresh()
    assert log.view() == {"in_flight": [], "recent": []}
    usage = json.loads(
        line(
            "DownstreamEnd",
            status="200",
            ms="4000",
            ttfb_ms="1000",
            upstream="127.0.0.1:9",
            prompt_tokens="3",
            completion_tokens="60",
        )
    )
    log.ended([usage])
    (done,) = log.view()["recent"]
    assert (done["request_id"], done["status"], done["completion_tokens"]) == ("r1", 200, 60)
    assert (done["worker"], done["duration_s"], done["ttfb_s"]) == ("w1", 4.0, 1.0)


def test_requests_that_ended_come_from_the_ledgers_reading_of_the_usage_log(tmp_path: Path) -> None:
    """A request shorter than a second has no live line at all (Envoy writes its end there only past
    LIVE_END_MIN_MS): the ledger hands the last lines of each batch it reads to the live view, which keeps the
    newest RECENT, newest first; a line the ledger skips is skipped here too, and one of a request still shown
    in flight takes it out of flight."""
    from controller.console.live import RECENT
    from controller.gateway.ledger import Ledger

    live_path = tmp_path / "live.log"
    live_path.write_text("")
    log = LiveLog(live_path, lambda _: None, Clock())
    log.refresh()
    with live_path.open("a") as f:
        f.write(line("DownstreamPeriodic", "r-long", ms="1000"))
    log.refresh()
    assert [r["request_id"] for r in log.view()["in_flight"]] == ["r-long"]
    ledger = Ledger(tmp_path / "usage.db")
    ledger.ended = log.ended
    usage = tmp_path / "usage.log"
    with usage.open("w") as f:
        for i in range(120):
            f.write(line("DownstreamEnd", f"r{i}", status="200", ms="12", prompt_tokens="3", completion_tokens="5"))
        f.write('{"request_id": "odd", "time": "not a number", "user": "alice", "model": "m"}\n')
        f.write(line("DownstreamEnd", "r-long", status="200", ms="1500", completion_tokens="9"))
    assert ledger.ingest(usage) == 121  # the odd line is no request to the ledger either
    view = log.view()
    assert view["in_flight"] == []
    ids = [r["request_id"] for r in view["recent"]]
    # the batch's last RECENT lines, less the odd one (skipped): the newest first
    assert len(ids) == RECENT - 1 and ids[:3] == ["r-long", "r119", "r118"] and ids[-1] == "r72", ids
    ledger.close()


def test_a_request_whose_end_was_lost_leaves_the_view(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    path.write_text("")
    clock = Clock()
    log = LiveLog(path, lambda _: None, clock)
    log.refresh()
    path.write_text(line("DownstreamPeriodic"))
    log.refresh()
    assert len(log.view()["in_flight"]) == 1
    clock.now += STALE_S + 0.1
    log.refresh()
    assert log.view()["in_flight"] == []


def test_the_live_log_is_cut_back_when_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    path.write_text("")
    log = LiveLog(path, lambda _: None, Clock())
    log.refresh()
    with path.open("a") as f:  # Envoy appends; a cut file starts again at 0
        for i in range(MAX_BYTES // 100 + 10):
            f.write(line("DownstreamEnd", f"r{i}", status="200"))
    while path.stat().st_size:
        log.refresh()
    assert path.stat().st_size == 0 and log.offset == 0
    with path.open("a") as f:
        f.write(line("DownstreamPeriodic", "after"))
    log.refresh()
    assert log.view()["in_flight"][0]["request_id"] == "after"


def fleet(tmp_path: Path) -> Path:
    data = {
        "version": 1,
        "name": "t",
        "mesh": {"kind": "none"},
        "hosts": [{"name": "local", "address": "127.0.0.1", "cpu_workers": 2}],
        "swap_groups": [{"name": "g", "host": "local", "cpu_slots": 1}],
        "models": [
            {
                "name": "m",
                "backend": "llamacpp",
                "source": {"gguf": "m.gguf"},
                "context": 512,
                "arch": {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.01},
                "device": "cpu",
            },
            {
                "name": "od",
                "backend": "llamacpp",
                "source": {"gguf": "m.gguf"},
                "context": 512,
                "arch": {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.01},
                "device": "cpu",
                "swap": {"group": "g"},
            },
        ],
        "groups": [{"name": "ops", "admin": True}, {"name": "staff"}],
        "users": [
            {"name": "root", "admin": True},
            {"name": "olga", "groups": ["ops"]},
            {"name": "sam", "groups": ["staff"]},
        ],
        "gateway": {"host": "local", "public_name": "localhost", "tls": {"mode": "internal"}},
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_admins_are_the_users_and_groups_the_spec_marks(tmp_path: Path) -> None:
    spec: Fleet = load_spec(fleet(tmp_path)).fleet
    assert auth.is_admin(spec, "root", ())
    assert auth.is_admin(spec, "olga", ("ops",))
    assert not auth.is_admin(spec, "sam", ("staff",))
    assert not auth.is_admin(spec, "nobody", ())
    assert "set `admin: true`" in auth.not_admin_message(spec, "sam")


def request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def test_csrf_needs_the_sessions_token_and_this_hosts_origin() -> None:
    sessions = auth.Sessions()
    token, session = sessions.create("root", (), "api key x")
    assert sessions.get(token) == session
    good = {"host": "gw:8443", "x-csrf-token": session.csrf}
    assert auth.csrf_ok(session, request(good))
    assert auth.csrf_ok(session, request({**good, "origin": "https://gw:8443", "sec-fetch-site": "same-origin"}))
    assert not auth.csrf_ok(session, request({**good, "x-csrf-token": "other"}))
    assert not auth.csrf_ok(session, request({"host": "gw:8443"}))
    assert not auth.csrf_ok(session, request({**good, "origin": "https://evil.example"}))
    assert not auth.csrf_ok(session, request({**good, "sec-fetch-site": "cross-site"}))
    sessions.end(token)
    assert sessions.get(token) is None


def actions(tmp_path: Path) -> tuple[Actions, KeyStore, Audit]:
    plan = make_plan(load_spec(fleet(tmp_path)))
    keys = KeyStore(tmp_path / "keys.db")
    audit = Audit(tmp_path / "audit.log")
    return Actions(lambda: plan, keys, audit, lambda: None, None), keys, audit


def test_each_action_is_audited_before_and_after_with_who(tmp_path: Path) -> None:
    act, keys, audit = actions(tmp_path)
    session = auth.Session("root", (), "api key abc", "csrf", 0)
    made = act.run(session, {"action": "create_key", "target": "sam", "label": "ci", "expires_days": "7"})
    record = keys.get(made["id"])
    assert record is not None and record.user == "sam" and record.label == "ci" and record.expires is not None
    assert keys.check(made["key"]) is not None
    act.run(session, {"action": "revoke_key", "target": made["id"]})
    assert keys.check(made["key"]) is None
    entries = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(e["action"], e["phase"]) for e in entries] == [
        ("create_key", "asked"),
        ("create_key", "done"),
        ("revoke_key", "asked"),
        ("revoke_key", "done"),
    ]
    assert all(e["actor"] == "root" and e["via"] == "api key abc" for e in entries)
    assert made["key"] not in (tmp_path / "audit.log").read_text()  # the key itself is never written
    assert audit.last(1)[0]["action"] == "revoke_key"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"action": "format_disk", "target": "x"}, 400, "unknown"),
        ({"action": "create_key", "target": "mallory"}, 400, "not a user of the spec"),
        ({"action": "create_key", "target": "sam", "app": "Need Job"}, 400, "app 'Need Job'"),
        ({"action": "create_key", "target": "sam", "expires_days": "-1"}, 400, "expires_days"),
        ({"action": "revoke_key", "target": "000000000000"}, 404, "no such key"),
        ({"action": "load", "target": "m"}, 400, "not on demand; on-demand models: od"),
        ({"action": "restart", "target": "ghost"}, 400, "not in the plan"),
    ],
)
def test_a_bad_action_is_refused_with_what_to_do(tmp_path: Path, body: dict[str, Any], status: int, words: str) -> None:
    act, keys, _ = actions(tmp_path)
    with pytest.raises(ActionError) as refused:
        act.run(auth.Session("root", (), "api key abc", "", 0), body)
    assert refused.value.status == status and words in str(refused.value)
    assert keys.list() == []


def test_an_action_whose_audit_cannot_be_written_is_not_done(tmp_path: Path) -> None:
    act, keys, audit = actions(tmp_path)
    audit.path = tmp_path / "no-such-folder" / "audit.log"
    with pytest.raises(ActionError) as refused:
        act.run(auth.Session("root", (), "api key abc", "", 0), {"action": "create_key", "target": "sam"})
    assert refused.value.status == 503 and "nothing was done" in str(refused.value)
    assert keys.list() == [] and not os.path.exists(audit.path)


def card_health(tmp_path: Path, model: str, proc: dict[str, Any], swap: dict[str, Any] | None = None) -> str:
    """The health a worker's card shows while Envoy still counts it healthy and the supervisor says ``proc``."""
    plan = make_plan(load_spec(fleet(tmp_path)))
    worker = next(w for w in plan.workers if w.model == model)
    collector = Collector(lambda: plan, tmp_path / "usage.db", LiveLog(tmp_path / "live.log", lambda _: None), None)
    try:
        envoy = {worker_cluster(worker.name): {"membership_healthy": 1}}
        slots = None if swap is None else {"workers": {worker.name: swap}}
        return str(collector._card(plan, worker, envoy, {worker.name: proc}, slots)["health"])
    finally:
        collector.http.close()
        collector.pool.shutdown()


@pytest.mark.parametrize(
    ("state", "pid", "health"),
    [
        ("healthy", 11, "up"),
        # Killed and restarted before Envoy's next health check: Envoy still routes to it, but it is not serving.
        ("starting", 12, "down"),
        ("backoff", None, "down"),
        ("unhealthy", 11, "down"),
    ],
)
def test_a_resident_workers_card_is_up_only_once_its_process_passed_a_health_check(
    tmp_path: Path, state: str, pid: int | None, health: str
) -> None:
    assert card_health(tmp_path, "m", {"state": state, "pid": pid}) == health


def test_an_on_demand_worker_that_is_loading_is_not_shown_down(tmp_path: Path) -> None:
    assert card_health(tmp_path, "od", {"state": "starting", "pid": 12}, {"state": "loading"}) == "up"


def test_an_open_event_stream_gets_each_new_picture_at_once_and_nothing_else(tmp_path: Path) -> None:
    """The console's `/console/events` on a real server (uvicorn, as the gatekeeper runs it): the first picture
    whole, then each newer one as a patch of the sections that changed, sent as soon as the collector has it (a
    stream waits on the collector, it does not poll); a picture that changes nothing sends nothing."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from fastapi import FastAPI

    from controller.console.routes import Console, mount
    from controller.gateway.access import Identity

    spec = load_spec(fleet(tmp_path))
    plan = make_plan(spec)
    collector = Collector(lambda: plan, tmp_path / "usage.db", LiveLog(tmp_path / "live.log", lambda _: None), None)
    acts, keys, audit = actions(tmp_path)
    root = Identity("root", (), frozenset({"*"}), key_id="k1")
    console = Console(
        fleet_of=lambda: spec.fleet,
        identify_key=lambda key: root if key == "sk-root" else None,
        sso_identity=lambda _: None,
        sso_configured=False,
        collector=collector,
        actions=acts,
        audit=audit,
        keys=keys,
        sessions=auth.Sessions(),
    )
    app = FastAPI()
    mount(app, console)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
            time.sleep(0.02)
        collector.publish({"time": 1.0, "workers": ["a"], "hosts": []})
        events: list[tuple[str, dict[str, Any], float]] = []
        with (
            httpx.Client(timeout=httpx.Timeout(5, read=5)) as http,
            http.stream(
                "GET", f"http://127.0.0.1:{port}/console/events", headers={"Authorization": "Bearer sk-root"}
            ) as reply,
        ):
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
            kind = ""
            sent_at = 0.0
            for text in reply.iter_lines():
                if text.startswith("event: "):
                    kind = text[7:]
                elif text.startswith("data: "):
                    events.append((kind, json.loads(text[6:]), time.monotonic() - sent_at))
                    if len(events) == 1:  # the same sections again: nothing to send; then a change
                        collector.publish({"time": 2.0, "workers": ["a"], "hosts": []})
                        sent_at = time.monotonic()
                        collector.publish({"time": 3.0, "workers": ["a", "b"], "hosts": []})
                    elif len(events) == 2:
                        sent_at = time.monotonic()
                        collector.publish({"time": 4.0, "workers": ["a", "b"], "hosts": ["h"]})
                    else:
                        break
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        collector.http.close()
        collector.pool.shutdown()
    assert [(k, d) for k, d, _ in events] == [
        ("snapshot", {"time": 1.0, "workers": ["a"], "hosts": [], "audit": []}),
        ("patch", {"workers": ["a", "b"], "time": 3.0}),
        ("patch", {"hosts": ["h"], "time": 4.0}),
    ]
    # As soon as it is made: well under the stream's 1 s wake-up without a picture (a lost wake-up waits that long).
    assert max(after for _, _, after in events[1:]) < 0.5, events
