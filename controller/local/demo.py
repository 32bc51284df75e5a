"""The demo fleet: a tiny model on CPU as two models, one with two replicas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.atomic import write_file
from controller.local.demo_model import write_demo_model
from controller.local.state import StateDir

DEMO_USER = "demo"


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
                "cpu_workers": 3,
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
            {
                "name": "tiny-embed",
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": model},
                "context": 512,
                "parallel": 2,
                "options": {"embeddings": True, "pooling": "mean", "threads": 1},
            },
        ],
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
                "prometheus": ports.prometheus,
                "alertmanager": ports.alertmanager,
                "grafana": ports.grafana,
            },
        },
        "auth": {"api_keys": True, "revocation_delay_s": 2},
        "users": [{"name": DEMO_USER, "models": ["*"]}],
    }


def write_demo(state: StateDir, ports: DemoPorts) -> Path:
    """Write the demo model (once) and the demo fleet spec into the state folder; return the spec."""
    state.create()
    model = state.models / "demo.gguf"
    if not model.exists():
        write_demo_model(model)
    spec = state.root / "demo-fleet.yaml"
    text = "# The demo fleet written by `controller up --demo`.\n" + yaml.safe_dump(demo_fleet(ports), sort_keys=False)
    write_file(spec, text)
    return spec
