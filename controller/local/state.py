"""The state folder of a local stack, and process identity.

Everything a running stack keeps lives under one folder (``--state-dir``,
default ``$XDG_STATE_HOME/fleet`` or ``~/.local/state/fleet``), so several
stacks can run side by side:

    supervisor.json   the supervisor's pid, start time, spec and its hash
    state.json        the process table, written atomically by the supervisor
    control.sock      the supervisor's control socket (status, restart, stop, down)
    config/           rendered Envoy and Caddy configs for this stack
    logs/<name>.log   one log per process, kept to about 10 MiB; <name>.log.1 has what came
                      before its last cut (controller/local/logcap.py)
    caddy/            Caddy's data: the internal CA and certificates
    gatekeeper/       the key store, the usage log and ledger, the demo key (mode 0700)
    secrets/          the worker secret, for the workers and Envoy (mode 0600)
    run/              Envoy's socket behind Caddy (gateway.front: caddy; private)
    models/           the demo model

A PID alone is not an identity (PIDs are reused); a process is "ours" when
its PID is alive and its start time matches what we recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.atomic import write_file


def default_state_dir() -> Path:
    env = os.environ.get("FLEET_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleet"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def supervisor(self) -> Path:
        return self.root / "supervisor.json"

    @property
    def table(self) -> Path:
        return self.root / "state.json"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def caddy(self) -> Path:
        return self.root / "caddy"

    @property
    def gatekeeper(self) -> Path:
        return self.root / "gatekeeper"

    @property
    def usage_log(self) -> Path:
        """Envoy's usage log, read by the gatekeeper into the ledger."""
        return self.gatekeeper / "usage.log"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tls(self) -> Path:
        """The certificate Envoy serves, as the gatekeeper publishes it (an SDS file; private)."""
        return self.root / "tls"

    @property
    def secrets(self) -> Path:
        """The worker secret: workers require it, Envoy sends it (controller/secrets.py; private)."""
        return self.root / "secrets"

    @property
    def front_socket(self) -> Path:
        """Behind Caddy (gateway.front: caddy): the Unix socket Envoy takes Caddy's requests on (private)."""
        return self.root / "run" / "envoy-front.sock"

    @property
    def ca_cert(self) -> Path:
        """The root certificate of Caddy's internal CA; clients trust this file."""
        return self.caddy / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def create(self) -> None:
        for folder in (self.root, self.config, self.logs, self.caddy, self.gatekeeper, self.models, self.tls):
            folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.gatekeeper, 0o700)
        os.chmod(self.tls, 0o700)
        for private in (self.secrets, self.front_socket.parent):
            private.mkdir(mode=0o700, exist_ok=True)
            os.chmod(private, 0o700)

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        write_file(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def is_same_process(pid: int | None, started: int | None) -> bool:
    return pid is not None and started is not None and start_time(pid) == started
