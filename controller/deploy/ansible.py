"""Running the playbooks of ``ansible/`` against an inventory generated from the spec, and reading their results.

Each run is `ansible-playbook` (the pinned `ansible` package, in the controller's own environment) with:

- an inventory written from the spec: one host per spec host, reached at its `ssh` target
  (``user@host[:port]``; a host without one is the local machine), Python at ``/usr/bin/python3``;
- its variables in a JSON file (``-e @file``), never on the command line (they may name secret paths);
- the `json` stdout callback, so the result of every task on every host comes back as data;
- explicit fact gathering (none unless a play asks), pipelining and bounded forks: hosts run in parallel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import DeployError
from controller.render import ASSETS
from controller.spec.models import Fleet

PLAYBOOKS = ASSETS / "ansible"
FORKS = 16  # hosts worked on at once
REMOTE_PYTHON = "/usr/bin/python3"
SCRIPT_MARKER = "FLEET-SCRIPT-JSON"  # ansible/files/{probe,status_probe,drain}.py print their document after it
ROLLED_BACK_TASK = (
    "rolled back"  # the last task of the fleet_host role's rescue (ansible/roles/fleet_host/tasks/rollback.yml)
)


@dataclass(frozen=True)
class Connection:
    """How the controller reaches hosts: an ssh_config file and a key, where the operator's defaults do not do."""

    ssh_config: Path | None = None
    ssh_key: Path | None = None


def inventory(fleet: Fleet, hosts: list[str], conn: Connection) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for host in fleet.hosts or []:
        if host.name not in hosts:
            continue
        v: dict[str, Any] = {"ansible_python_interpreter": REMOTE_PYTHON, "fleet_host": host.name}
        if host.ssh is None:
            v["ansible_connection"] = "local"
        else:
            m = re.match(r"^(?:(?P<user>[^@]+)@)?(?P<host>[^:]+)(?::(?P<port>\d+))?$", host.ssh)
            assert m is not None  # the spec's pattern guarantees it
            v["ansible_host"] = m["host"]
            if m["user"]:
                v["ansible_user"] = m["user"]
            if m["user"] and m["user"] != "root":  # a user with sudo (without a password prompt: BatchMode)
                v["ansible_become"] = True
            if m["port"]:
                v["ansible_port"] = int(m["port"])
            args = []
            if conn.ssh_config is not None:
                args += ["-F", str(conn.ssh_config)]
            args += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
            v["ansible_ssh_common_args"] = " ".join(args)
            if conn.ssh_key is not None:
                v["ansible_ssh_private_key_file"] = str(conn.ssh_key)
        out[host.name] = v
    return {"all": {"hosts": out}}


@dataclass
class HostResult:
    ok: bool = True
    unreachable: bool = False
    failed_task: str | None = None
    message: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # task name -> its result on this host


def run_playbook(
    playbook: str,
    fleet: Fleet,
    hosts: list[str],
    conn: Connection,
    variables: dict[str, Any],
    host_vars: dict[str, dict[str, Any]] | None = None,
    check: bool = False,
    timeout_s: float = 1800,
) -> dict[str, HostResult]:
    """Run ``ansible/<playbook>`` on ``hosts``; the outcome per host (every host asked about is in the answer)."""
    binary = Path(sys.executable).with_name("ansible-playbook")
    if not binary.exists():
        raise DeployError(f"ansible-playbook not found next to {sys.executable}; reinstall: pip install -e .")
    inv = inventory(fleet, hosts, conn)
    for name, extra in (host_vars or {}).items():
        if name in inv["all"]["hosts"]:
            inv["all"]["hosts"][name].update(extra)
    with tempfile.TemporaryDirectory(prefix="fleet-ansible-") as tmp:
        inv_file = Path(tmp) / "inventory.json"
        vars_file = Path(tmp) / "vars.json"
        inv_file.write_text(json.dumps(inv))
        vars_file.write_text(json.dumps(variables))
        os.chmod(vars_file, 0o600)
        cmd = [str(binary), "-i", str(inv_file), "-e", f"@{vars_file}", str(PLAYBOOKS / playbook)]
        if check:
            cmd.append("--check")
        env = {
            **os.environ,
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_GATHERING": "explicit",
            "ANSIBLE_PIPELINING": "true",
            "ANSIBLE_FORKS": str(FORKS),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_LOCAL_TEMP": str(Path(tmp) / "local"),
            "ANSIBLE_HOME": str(Path(tmp) / "home"),
            "ANSIBLE_GALAXY_DISABLE_GPG_VERIFY": "true",
            "ANSIBLE_DEPRECATION_WARNINGS": "false",
            "ANSIBLE_SSH_RETRIES": "2",
            # The `script` module is not pipelined; with a terminal (ssh -tt, the default) the remote stderr is
            # merged into stdout. Without one, the scripts' documents come back as printed.
            "ANSIBLE_SSH_USETTY": "false",
        }
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"ansible-playbook {playbook} ran past {timeout_s:.0f} s and was stopped") from exc
    return parse(proc.stdout, proc.stderr, hosts, playbook)


def script_doc(stdout: str, what: str) -> dict[str, Any]:
    """The JSON document a script of ``ansible/files`` printed after its marker line (the last one wins, so stray
    lines before it, a terminal's CRLF or a warning, do no harm). Raises ValueError saying what came instead."""
    text = stdout.replace("\r\n", "\n")
    at = text.rfind(SCRIPT_MARKER + " ")
    if at < 0:
        raise ValueError(f"{what} printed no document (no {SCRIPT_MARKER} line): {_excerpt(text)}")
    line = text[at + len(SCRIPT_MARKER) + 1 :].split("\n", 1)[0]
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{what} printed a document that is not JSON ({exc}): {_excerpt(line)}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} printed {type(doc).__name__}, not a JSON object: {_excerpt(line)}")
    return doc


def _excerpt(text: str, keep: int = 120) -> str:
    """The head and the tail of a long output, so both what went wrong first and last are shown."""
    text = text.strip()
    if not text:
        return "no output"
    return repr(text) if len(text) <= 2 * keep else f"{text[:keep]!r} … {text[-keep:]!r}"


def parse(stdout: str, stderr: str, hosts: list[str], playbook: str) -> dict[str, HostResult]:
    start = stdout.find("{")
    try:
        doc = json.loads(stdout[start:]) if start >= 0 else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise DeployError(f"ansible-playbook {playbook} did not run: {' | '.join(tail) or 'no output'}")
    out = {h: HostResult() for h in hosts}
    for play in doc.get("plays", []):
        for task in play.get("tasks", []):
            name = task.get("task", {}).get("name", "")
            for host, result in task.get("hosts", {}).items():
                r = out.setdefault(host, HostResult())
                r.results[name] = result
                if result.get("unreachable"):
                    r.ok, r.unreachable = False, True
                    r.failed_task = r.failed_task or name
                    r.message = r.message or str(result.get("msg", "unreachable")).strip()
                elif result.get("failed") and not result.get("ignore_errors"):
                    r.ok = False
                    if r.failed_task is None:
                        r.failed_task, r.message = name, _failure_message(result)
                    elif name.endswith(ROLLED_BACK_TASK):  # the rescue's report says it all: step, log, rollback
                        r.message = _failure_message(result)
    for host, stats in doc.get("stats", {}).items():
        r = out.setdefault(host, HostResult())
        if stats.get("unreachable") and r.ok:
            r.ok, r.unreachable, r.message = False, True, r.message or "unreachable"
        if stats.get("failures") and r.ok:
            r.ok = False
    return out


def _failure_message(result: dict[str, Any]) -> str:
    parts = [str(result.get("msg", "")).strip()]
    for key in ("stderr", "stdout"):
        text = str(result.get(key, "") or "").strip()
        if text:
            parts.append(text.splitlines()[-1][:300])
    return ": ".join(p for p in parts if p) or "failed"
