"""The fleet the multihost tier deploys: a spec of the homelab's shape on the fake hosts, its images, `controller
deploy` as the operator runs it from the laptop (the root namespace).

- Spec: `examples/homelab.yaml`'s shape (a WireGuard mesh, a gateway box, GPU hosts, users with and without
  limits) with the tiny model: `tiny-chat` (2 replicas, one on each GPU host) and `tiny-embed` (gpu1's second GPU).
  Mesh addresses 10.77.0.x; endpoints and SSH targets are the hosts' underlay addresses.
- Images: the project's own (`controller images build`, saved with `podman save`, shipped by deploy's `--image`)
  and stand-ins for the third-party ones (tests/images.py: the same programs at the same paths, loaded into each
  host's store as a real host would pull them).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import yaml

from controller.local.demo_model import write_demo_model
from tests.multihost.hosts import Hosts

VENV_BIN = Path(sys.executable).parent
MESH = "10.77.0"
PUBLIC_NAME = "llm.mh.test"  # clients dial the gateway's address and name this one (TLS SNI, Host): no DNS here
COMPOSE = str(VENV_BIN / "podman-compose")  # the hosts share this machine's files: the venv's podman-compose


def fleet_spec(hosts: Hosts, model: str = "models/tiny.gguf") -> dict[str, Any]:
    spec_hosts = []
    for i, host in enumerate(hosts):
        entry: dict[str, Any] = {
            "name": host.name,
            "address": f"{MESH}.{i + 1}",
            "ssh": host.ssh_target,
            "endpoint": f"{host.address}:51820",
            "runtime": "compose",
        }
        if host.gpus:
            entry["gpus"] = [g.as_spec() for g in host.gpus]
        spec_hosts.append(entry)
    gpu1 = hosts["gpu1"].gpus
    return {
        "version": 1,
        "name": "mh",
        "mesh": {"kind": "wireguard", "subnet": f"{MESH}.0/24", "listen_port": 51820},
        "hosts": spec_hosts,
        "models": [
            {
                "name": "tiny-chat",
                "aliases": ["tiny"],
                "backend": "llamacpp",
                "source": {"gguf": model},
                "context": 1024,
                "parallel": 64,  # 50 live streams and a steady load on one replica while the other is replaced
                "replicas": 2,
                "options": {"threads": 1},
                "placement": [{"host": "gpu1", "gpus": [gpu1[0].uuid]}, {"host": "gpu2"}],
            },
            {
                "name": "tiny-embed",
                "backend": "llamacpp",
                "source": {"gguf": model},
                "context": 512,
                "parallel": 2,
                "task": "embed",
                "options": {"pooling": "mean", "threads": 1},
                "placement": [{"host": "gpu1", "gpus": [gpu1[1].uuid]}],
            },
        ],
        "gateway": {
            "host": "gateway",
            "public_name": PUBLIC_NAME,
            "tls": {"mode": "internal"},
            "max_body_mib": 4,
        },
        "auth": {"api_keys": True, "revocation_delay_s": 2},
        "groups": [{"name": "parents", "models": ["*"], "admin": True}],  # the console is theirs
        "users": [
            {"name": "alice", "groups": ["parents"]},
            {"name": "bob", "models": ["tiny-embed"]},
        ],
    }


def write_fleet(folder: Path, hosts: Hosts, **changes: Any) -> Path:
    """The spec and the tiny model in ``folder``; ``changes`` replace top-level keys of the spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    if not (folder / "models" / "tiny.gguf").exists():
        write_demo_model(folder / "models" / "tiny.gguf", name="tiny")
    spec = {**fleet_spec(hosts), **changes}
    path = folder / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@dataclass
class Deploy:
    rc: int
    out: dict[str, Any]
    stderr: str
    seconds: float

    def host(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.out["hosts"][name]
        return result


def controller(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(VENV_BIN / "controller"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def deploy(
    spec: Path, hosts: Hosts, state: Path, images: dict[str, Path], *extra: str, ssh_config: Path | None = None
) -> Deploy:
    """`controller deploy --json` from the laptop, as the operator runs it; its exit code and report. ``ssh_config``:
    the laptop's ssh_config for the spec's ``ssh`` targets (default the hosts' own, `Hosts.ssh_config`)."""
    import time

    config = ssh_config or hosts.ssh_config
    args = ["deploy", str(spec), "--state-dir", str(state), "--ssh-config", str(config)]
    args += ["--compose", COMPOSE, "--json", *extra]
    for tag, archive in images.items():
        args += ["--image", f"{tag}={archive}"]
    began = time.monotonic()
    result = controller(*args)
    took = time.monotonic() - began
    try:
        out = json.loads(result.stdout)
    except ValueError:
        out = {}
    return Deploy(result.returncode, out, result.stderr, took)


def gateway_client(address: str, ca: Path, name: str = PUBLIC_NAME) -> openai.DefaultHttpxClient:
    """An HTTP client for the gateway at ``address`` that names ``name`` (SNI and Host; default ``PUBLIC_NAME``),
    as a client that resolved the name would; the certificate is checked against ``ca`` for that name."""

    def name_it(request: Any) -> None:  # the SDK's httpx request
        request.headers["Host"] = name
        request.extensions["sni_hostname"] = name

    return openai.DefaultHttpxClient(
        verify=ssl.create_default_context(cafile=str(ca)), event_hooks={"request": [name_it]}, timeout=60
    )


@dataclass
class Fleet:
    hosts: Hosts
    folder: Path
    spec: Path
    state: Path
    images: dict[str, Path]  # the project's images, saved: deploy ships them
    store: tuple[list[str], dict[str, str]]  # the laptop's podman store (the images were built there)

    def deploy(self, *extra: str, spec: Path | None = None) -> Deploy:
        return deploy(spec or self.spec, self.hosts, self.state, self.images, *extra)


def podman(store: tuple[list[str], dict[str, str]], *args: str, timeout: float = 300) -> str:
    cmd, env = store
    result = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr[-2000:]}"
    return result.stdout


def first_reply(client: openai.OpenAI, model: str, timeout: float = 90) -> Any:
    """The first chat completion ``model`` answers through the gateway after a deploy: Envoy's health checks put
    new workers in rotation within a few intervals, so refusals and connection errors are retried until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8
            )
        except (openai.APIStatusError, openai.APIConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
