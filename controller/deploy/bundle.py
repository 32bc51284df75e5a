"""What each host must hold after a deploy: files (with modes), services and the digests that say when they change.

Built from the plan alone (plus the controller's secrets and mesh keys), so it is the same on every run for the
same spec: a second deploy of an unchanged spec finds nothing to do.

- Rendered files: ``<host>/...`` of `render_all` go to ``/etc/fleet/...`` on that host; Quadlet units
  (``<host>/quadlet/*``) to ``/etc/containers/systemd/``.
- ``/etc/fleet/spec/fleet.yaml``: the spec as loaded (hosts file merged, architectures resolved), so a container
  that reads the spec needs no other file of the operator's.
- Secrets (mode 0600, never in a rendered file): the worker secret and its Envoy SDS form on every host; the
  host's WireGuard private key; the OIDC client secret on the gateway (from the controller's machine, at the
  path the spec names, which is where the gatekeeper's container has it mounted from).
- Models: a local GGUF that a llama.cpp worker of the host reads, at the host path its container mounts.
- Services: one per container of the host (controller/render/containers.py), with a digest over its
  definition and every pushed file it mounts, so a changed Envoy config restarts Envoy and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.backends.llamacpp import LlamaCpp
from controller.errors import DeployError
from controller.gateway.access import gatekeeper_view
from controller.mesh import wireguard
from controller.plan.models import Plan
from controller.render import render_all
from controller.render.containers import (
    CONFIG_DIR,
    HOST_ENGINE_SOCKET,
    SECRETS_HOST_DIR,
    SPEC_PATH,
    Container,
    host_containers,
    oidc_secret_path,
)
from controller.secrets import KEY_FILE, SDS_FILE
from controller.spec import LoadedSpec

QUADLET_DIR = "/etc/containers/systemd"
# What the last deploy left on a host: the digests of the files it pushed and of the services it started.
DEPLOY_DIR = "/var/lib/fleet/deploy"
MANIFEST = f"{DEPLOY_DIR}/manifest.json"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # absolute, on the host
    source: Path | None  # a local file to copy (a model), or None: ``content``
    content: bytes = b""
    mode: int = 0o644
    secret: bool = False

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        if self.source is not None:
            with self.source.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(self.content)
        return h.hexdigest()


@dataclass
class HostBundle:
    host: str
    runtime: str
    files: dict[str, RemoteFile] = field(default_factory=dict)
    services: dict[str, str] = field(default_factory=dict)  # service (container) name -> digest
    workers: list[str] = field(default_factory=list)  # services that are workers, gated on an inference
    digests: dict[str, str] = field(default_factory=dict)  # path -> sha256, filled by ``seal``
    required: dict[str, str] = field(default_factory=dict)  # files the host must have already -> what needs them
    joins: dict[str, str] = field(default_factory=dict)  # service -> the service whose network namespace it joins

    def add(self, f: RemoteFile) -> None:
        self.files[f.path] = f

    def seal(self, containers: list[Container], views: dict[str, str] | None = None) -> None:
        self.digests = {path: f.digest for path, f in sorted(self.files.items())}
        for c in containers:
            digests = self.digests
            if c.name in (views or {}):  # it reads only part of the spec: that part decides, not the whole file
                digests = {**digests, SPEC_PATH: (views or {})[c.name]}
            self.services[c.name] = service_digest(c, digests)
            if c.network_of:
                self.joins[c.name] = c.network_of


def service_digest(c: Container, digests: dict[str, str]) -> str:
    """A digest of the container's definition and of every pushed file under a path it mounts or reads."""
    mounted = [v.source for v in c.volumes if v.is_bind] + [path for _, path, _ in c.secrets]
    files = {path: digest for path, digest in digests.items() if _under(path, mounted) and not _under(path, c.reloads)}
    doc = {"container": dataclasses.asdict(c), "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def spec_views(plan: Plan) -> dict[str, str]:
    """Services that read only part of the spec, and a digest of that part (`gatekeeper_view`): a model's options
    or images (which restart its workers) leave the gatekeeper running, and requests keep being answered."""
    return {"gatekeeper": gatekeeper_view(plan.fleet)}


def _under(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def resolved_spec(loaded: LoadedSpec) -> str:
    """The spec as loaded (hosts merged, `arch` resolved, `arch_from` dropped): readable without other files."""
    data = loaded.fleet.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data.pop("hosts_file", None)
    for model in data.get("models", []):
        model.pop("arch_from", None)
    header = f"# The fleet spec as `controller deploy` resolved it from {loaded.path.name}; do not edit here.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class Secrets:
    """The controller's local secret files for a fleet (see controller/deploy/engine.py's ``FleetState``)."""

    worker_dir: Path  # worker.key, worker-sds.yaml
    mesh_keys: dict[str, Path]  # host -> private key file (WireGuard), empty without a WireGuard mesh


def build(plan: Plan, loaded: LoadedSpec, secrets: Secrets, mesh_files: dict[str, str]) -> dict[str, HostBundle]:
    """Every host's bundle, by host name (hosts in spec order)."""
    spec_text = resolved_spec(loaded).encode()
    views = spec_views(plan)
    # Each host's files (paths `<host>/…`), sorted out once: a walk of the whole fleet's files for every host made
    # a large fleet's deploy grow with its square (issue 17).
    files: dict[str, list[tuple[str, str]]] = {}
    for rel, text in [*render_all(plan).items(), *mesh_files.items()]:
        host_name, _, inside = rel.partition("/")
        if inside:
            files.setdefault(host_name, []).append((inside, text))
    out: dict[str, HostBundle] = {}
    for host in plan.fleet.hosts or []:
        b = HostBundle(host.name, host.runtime)
        for inside, text in files.get(host.name, []):
            b.add(RemoteFile(_remote_path(inside), None, text.encode()))
        b.add(RemoteFile(SPEC_PATH, None, spec_text))
        for name in (KEY_FILE, SDS_FILE):
            b.add(RemoteFile(f"{SECRETS_HOST_DIR}/{name}", secrets.worker_dir / name, mode=0o600, secret=True))
        if host.name in secrets.mesh_keys:
            b.add(RemoteFile(wireguard.PRIVATE_KEY_PATH, secrets.mesh_keys[host.name], mode=0o600, secret=True))
        oidc = plan.fleet.auth.oidc
        if oidc is not None and host.name == plan.fleet.gateway.host:
            local = loaded.base_dir / oidc.client_secret_file  # an absolute path stays as it is
            if not local.is_file():
                raise DeployError(
                    f"auth.oidc.client_secret_file: {local} not found on this machine; deploy copies it from "
                    "here to the gateway host (mode 0600): create it with the client secret your provider gave you"
                )
            b.add(RemoteFile(oidc_secret_path(plan.fleet), local, mode=0o600, secret=True))
        for worker in plan.workers_on(host.name):
            if worker.backend == "llamacpp":
                _add_model(b, plan, loaded, worker.model)
            token = plan.fleet.secrets.hf_token_file
            if worker.backend == "vllm" and token:  # the operator's to put there (deploy does not copy a token)
                b.required[str(token)] = "vLLM workers: secrets.hf_token_file"
            if plan.model(worker.model).swap is not None:
                # The agent starts and stops on-demand workers through the engine's API, mounted from here.
                b.required[HOST_ENGINE_SOCKET[host.runtime]] = (
                    f"on-demand worker {worker.name}: the container engine's API socket (Docker's; for podman "
                    "`systemctl enable --now podman.socket` with podman-docker, or `podman system service`"
                    " listening there)"
                )
        containers = host_containers(plan, host.name)
        b.workers = [w.name for w in plan.workers_on(host.name)]
        b.seal(containers, views)
        out[host.name] = b
    return out


def _remote_path(rel: str) -> str:
    if rel.startswith("quadlet/"):
        return f"{QUADLET_DIR}/{rel[len('quadlet/') :]}"
    return f"{CONFIG_DIR}/{rel}"


def _add_model(b: HostBundle, plan: Plan, loaded: LoadedSpec, model_name: str) -> None:
    """A GGUF beside the spec (a relative `source.gguf`) is copied to the host; one at an absolute path is the
    host's own (the operator put it there), which preflight checks; a URL is the worker's to download."""
    model = plan.model(model_name)
    source = str(model.source.gguf or "")
    if not source or "://" in source:
        return
    if posixpath.isabs(source):
        b.required[source] = f"model {model_name}: source.gguf"
        return
    location, mount = LlamaCpp().model_location(model)
    if mount is None:
        return
    local = loaded.base_dir / source
    if not local.is_file():
        raise DeployError(
            f"model {model_name}: source.gguf {local} not found on this machine; deploy copies a model given by "
            "a relative path to the hosts that run it: put it there, or give an absolute path on the hosts"
        )
    remote = posixpath.join(mount, posixpath.relpath(location, "/models"))
    b.add(RemoteFile(remote, local, mode=0o644))
