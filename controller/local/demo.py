"""The demo fleet: a tiny model on CPU as two models, one with two replicas, and as two on-demand models that
share one CPU slot (one is loaded at a time, the one asked for); and the demo user's key."""

from __future__ import annotations

import filecmp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.atomic import write_file
from controller.gateway.keystore import KeyRecord, KeyStore
from controller.local.demo_model import write_demo_model
from controller.local.state import StateDir

DEMO_USER = "demo"
ON_DEMAND = ("tiny-story", "tiny-poem")  # on-demand models of the demo, one CPU slot between them
WORKER_PORTS = 5  # the demo's workers take this many ports from DemoPorts.workers
DEMO_KEY_FILE = "demo-key"  # in the gatekeeper's private folder, beside the key store
DEMO_KEY_LIFETIME_S = 30 * 86400
DEMO_KEY_RENEW_S = 86400  # a key with less than this left is replaced rather than handed out again


@dataclass(frozen=True)
class DemoPorts:
    """Loopback ports of a demo stack; tests pick free ones so stacks run side by side."""

    https: int = 8443
    http: int = 8480
    envoy: int = 18000
    envoy_admin: int = 18001
    gatekeeper: int = 18002
    caddy_admin: int = 18003
    caddy_tls: int = 18004
    swapper: int = 18005
    workers: int = 18100
    agent: int = 18400
    prometheus: int = 18091
    alertmanager: int = 18093
    grafana: int = 18300


def demo_fleet(ports: DemoPorts) -> dict[str, Any]:
    model = "models/demo.gguf"
    # One thread per worker: three llama-servers share a small machine's cores.
    return {
        "version": 1,
        "name": "demo",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": "local",
                "address": "127.0.0.1",
                "cpu_workers": 4,
                "worker_port_base": ports.workers,
                "agent_port": ports.agent,
            }
        ],
        "models": [
            {
                "name": "tiny-chat",
                "aliases": ["tiny"],
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": model},
                "context": 4096,
                "parallel": 2,
                "replicas": 2,
                "options": {"threads": 1},
            },
            *(
                {
                    "name": name,
                    "backend": "llamacpp",
                    "device": "cpu",
                    "source": {"gguf": model},
                    "context": 2048,
                    "parallel": 2,
                    "options": {"threads": 1},
                    "swap": {"group": "demo-swap"},
                }
                for name in ON_DEMAND
            ),
            {
                "name": "tiny-embed",
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": model},
                "context": 512,
                "parallel": 2,
                "task": "embed",
                "options": {"pooling": "mean", "threads": 1},
            },
        ],
        # More models than slots: the on-demand ones share one, and a request for the one not loaded swaps it in.
        "swap_groups": [{"name": "demo-swap", "host": "local", "cpu_slots": 1, "min_resident_s": 2}],
        "gateway": {
            "host": "local",
            "public_name": "localhost",
            "bind": "127.0.0.1",
            "tls": {"mode": "internal"},
            "max_body_mib": 4,
            "ports": {
                "https": ports.https,
                "http": ports.http,
                "envoy": ports.envoy,
                "envoy_admin": ports.envoy_admin,
                "gatekeeper": ports.gatekeeper,
                "caddy_admin": ports.caddy_admin,
                "caddy_tls": ports.caddy_tls,
                "swapper": ports.swapper,
                "prometheus": ports.prometheus,
                "alertmanager": ports.alertmanager,
                "grafana": ports.grafana,
            },
        },
        "auth": {"api_keys": True, "revocation_delay_s": 2},
        "users": [{"name": DEMO_USER, "models": ["*"], "admin": True}],  # the console opens for the demo's key
    }


def write_demo(state: StateDir, ports: DemoPorts) -> Path:
    """Write the demo model and the demo fleet spec into the state folder; return the spec.

    The model is rewritten only when this version of `write_demo_model` writes other bytes (it is deterministic),
    so an older demo model is replaced; a running worker keeps the file it opened until it restarts.
    """
    state.create()
    model = state.models / "demo.gguf"
    fresh = write_demo_model(state.models / ".demo.gguf.new")
    if model.exists() and filecmp.cmp(fresh, model, shallow=False):
        fresh.unlink()
    else:
        fresh.replace(model)
    spec = state.root / "demo-fleet.yaml"
    text = "# The demo fleet written by `controller up --demo`.\n" + yaml.safe_dump(demo_fleet(ports), sort_keys=False)
    write_file(spec, text)
    return spec


@dataclass(frozen=True)
class DemoKey:
    key: str
    record: KeyRecord
    reused: bool
    path: Path  # where its plaintext is kept


def demo_key(state: StateDir, now: float | None = None) -> DemoKey:
    """The demo user's API key, the same for every `controller up --demo` of this state folder.

    Keys are stored hashed, so to hand the same one out again its plaintext is kept in `gatekeeper/demo-key`
    (mode 0600, in the gatekeeper's folder of mode 0700, like the key store itself). It is minted with an expiry
    (30 days); a new one replaces it when it was revoked, expires within a day, or its file is gone, and a
    replaced key that still worked is revoked, so the demo user has one key at a time.
    """
    now = time.time() if now is None else now
    path = state.gatekeeper / DEMO_KEY_FILE
    store = KeyStore(state.gatekeeper / "keys.db")
    try:
        try:
            kept = path.read_text(encoding="utf-8").strip()
        except OSError:
            kept = ""
        record = store.check(kept, now) if kept else None
        if record is not None and record.user == DEMO_USER:
            if record.expires is None or record.expires - now > DEMO_KEY_RENEW_S:
                return DemoKey(kept, record, True, path)
            store.revoke(record.id)
        key, record = store.create(DEMO_USER, label="demo", expires=now + DEMO_KEY_LIFETIME_S)
        write_file(path, key + "\n", mode=0o600)
        return DemoKey(key, record, False, path)
    finally:
        store.close()
