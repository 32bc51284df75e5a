"""What an admin may do from the console, each step written to an audit log with who did it.

- `load` / `unload` a model: the swap coordinator (`POST /swap/load|unload/<model>`, with the worker secret),
  for on-demand models;
- `restart` a worker: in a `controller up` stack its supervisor restarts the process; on a fleet its host's
  agent restarts the container (`POST /v1/workers/<name>/restart`, with the worker secret);
- `create_key` (the new key is in the answer, once, and stored only hashed) and `revoke_key`.

The audit log (`console-audit.log` in the gatekeeper's state folder) gets one JSON line before the action (what
was asked, by whom) and one after (how it ended), each appended and flushed to disk: an action whose first line
cannot be written is not done. `controller keys` and the console share the key store, so a key made here is one
`controller keys list` shows.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from controller.console.auth import Session
from controller.errors import ControllerError
from controller.gateway.keystore import APP_PATTERN, APP_RULE, KeyStore
from controller.local.state import StateDir
from controller.plan.models import Plan

AUDIT_FILE = "console-audit.log"
ACTIONS = ("load", "unload", "restart", "create_key", "revoke_key")
LOAD_TIMEOUT_S = 900.0
DAY_S = 86400


class ActionError(ControllerError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def last(self, n: int = 20) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                lines = f.read().splitlines()[-n:]
        except OSError:
            return []
        out = []
        for line in reversed(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class Actions:
    def __init__(
        self,
        plan_of: Callable[[], Plan],
        keys: KeyStore,
        audit: Audit,
        worker_key: Callable[[], str | None],
        stack: StateDir | None,
    ) -> None:
        self.plan_of = plan_of
        self.keys = keys
        self.audit = audit
        self.worker_key = worker_key
        self.stack = stack

    def run(self, session: Session, body: dict[str, Any]) -> dict[str, Any]:
        action = str(body.get("action") or "")
        if action not in ACTIONS:
            raise ActionError(400, f"action {action!r}: unknown; one of {', '.join(ACTIONS)}")
        target = str(body.get("target") or "")
        asked = {"time": time.time(), "actor": session.user, "via": session.via, "action": action, "target": target}
        try:
            self.audit.write({**asked, "phase": "asked"})
        except OSError as exc:
            raise ActionError(
                503, f"the audit log {self.audit.path} cannot be written ({exc}); nothing was done"
            ) from None
        try:
            result: dict[str, Any] = getattr(self, f"_{action}")(target, body)
        except ActionError as exc:
            self._done(asked, False, str(exc))
            raise
        except Exception as exc:
            self._done(asked, False, str(exc))
            raise ActionError(502, f"{action} {target}: {exc}") from None
        public = {k: v for k, v in result.items() if k != "key"}  # the new key itself goes to the admin only
        self._done(asked, True, str(result.get("message") or "done"), public)
        return result

    def _done(self, asked: dict[str, Any], ok: bool, message: str, extra: dict[str, Any] | None = None) -> None:
        try:
            self.audit.write({**asked, "phase": "done", "ok": ok, "message": message, **(extra or {})})
        except OSError as exc:
            print(f"console audit: cannot write the result of {asked}: {exc}", flush=True)

    # -- the actions ----------------------------------------------------------------

    def _swap(self, action: str, model: str) -> dict[str, Any]:
        plan = self.plan_of()
        names = {n for w in plan.on_demand() for n in plan.model(w.model).served_names}
        if model not in names:
            known = ", ".join(sorted({w.model for w in plan.on_demand()})) or "none"
            raise ActionError(400, f"model {model!r} is not on demand; on-demand models: {known}")
        port = plan.fleet.gateway.ports.swapper
        reply = self._post(f"http://127.0.0.1:{port}/swap/{action}/{model}", "the swap coordinator")
        doc = _json(reply)
        if reply.status_code >= 400:
            message = (doc.get("error") or {}).get("message") if isinstance(doc.get("error"), dict) else None
            raise ActionError(reply.status_code, f"{action} {model}: {message or reply.text[:300]}")
        return {"message": f"{model}: {action}ed", "swap": doc}

    def _post(self, url: str, who: str) -> httpx.Response:
        """A POST with the worker secret, which the swap coordinator's and the agents' routes require."""
        key = self.worker_key()
        if key is None:
            raise ActionError(503, "the worker secret is not readable here; the gatekeeper needs --secrets-dir")
        try:
            return httpx.post(url, headers={"Authorization": f"Bearer {key}"}, timeout=LOAD_TIMEOUT_S, trust_env=False)
        except httpx.HTTPError as exc:
            raise ActionError(502, f"{who} did not answer: {exc}") from None

    def _load(self, target: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._swap("load", target)

    def _unload(self, target: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._swap("unload", target)

    def _restart(self, target: str, body: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan_of()
        worker = next((w for w in plan.workers if w.name == target), None)
        if worker is None:
            raise ActionError(
                400, f"worker {target!r}: not in the plan; workers: {', '.join(w.name for w in plan.workers)}"
            )
        if self.stack is not None:
            from controller.local import stack

            answer = stack.request(self.stack, "restart", target)
            return {"message": str(answer.get("message") or f"restarted {target}")}
        host = plan.host(worker.host)
        address = f"[{host.address}]" if ":" in str(host.address) else str(host.address)
        reply = self._post(
            f"http://{address}:{host.agent_port}/v1/workers/{target}/restart", f"the agent of host {worker.host}"
        )
        doc = _json(reply)
        if reply.status_code >= 400:
            raise ActionError(reply.status_code, f"restart {target}: {doc.get('detail') or reply.text[:300]}")
        return {"message": str(doc.get("message") or f"restarted {target}")}

    def _create_key(self, target: str, body: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan_of()
        users = {u.name for u in plan.fleet.users}
        if target not in users:
            raise ActionError(
                400, f"user {target!r}: not a user of the spec; users: {', '.join(sorted(users)) or 'none'}"
            )
        label = _optional(body.get("label"), "label", r"^[^\x00-\x1f]{1,80}$", "up to 80 printable characters")
        app = _optional(body.get("app"), "app", APP_PATTERN.pattern, APP_RULE)
        days = body.get("expires_days")
        if days not in (None, ""):
            try:
                days_f = float(days)
            except (TypeError, ValueError):
                days_f = -1.0
            if not 0 < days_f <= 3650:
                raise ActionError(400, f"expires_days {days!r}: give a number of days from 1 to 3650, or none")
        expires = None if days in (None, "") else time.time() + float(days) * DAY_S
        key, record = self.keys.create(target, None, expires, label, app or None)
        return {"message": f"key {record.id} created for {target}", "id": record.id, "key": key}

    def _revoke_key(self, target: str, body: dict[str, Any]) -> dict[str, Any]:
        record = self.keys.get(target)
        if record is None:
            raise ActionError(404, f"key {target!r}: no such key id")
        if not self.keys.revoke(target):
            return {"message": f"key {target} was revoked already"}
        return {"message": f"key {target} of {record.user} revoked"}


def _optional(value: Any, field: str, pattern: str, what: str) -> str | None:
    if value in (None, ""):
        return None
    text = str(value)
    if not re.fullmatch(pattern, text):
        raise ActionError(400, f"{field} {text!r}: {what}")
    return text


def _json(reply: httpx.Response) -> dict[str, Any]:
    try:
        doc = reply.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
