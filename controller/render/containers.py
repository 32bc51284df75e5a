"""One description of every container a host runs, shared by Compose and Quadlet.

The Compose and Quadlet renderers only translate these specs into their
formats, so the two outputs cannot drift apart in what they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller import backends
from controller.backends.llamacpp import LlamaCpp
from controller.plan.models import Plan, Worker

HF_TOKEN_SECRET = "fleet-hf-token"
HF_TOKEN_TARGET = "/run/secrets/hf_token"
CONFIG_DIR = "/etc/fleet"  # where deploy puts each host's rendered files


@dataclass(frozen=True)
class Volume:
    source: str  # a named volume, or an absolute host path for a bind mount
    target: str
    read_only: bool = False

    @property
    def is_bind(self) -> bool:
        return self.source.startswith("/")


@dataclass(frozen=True)
class Health:
    cmd: list[str]  # exec form, first item "CMD"
    interval_s: int = 15
    timeout_s: int = 5
    retries: int = 3
    start_period_s: int = 60


@dataclass(frozen=True)
class Container:
    name: str
    description: str
    image: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # CDI names
    ports: list[tuple[str, int, int]] = field(default_factory=list)  # host ip, host port, container port
    volumes: list[Volume] = field(default_factory=list)
    secrets: list[tuple[str, str, str]] = field(default_factory=list)  # name, host file, target
    health: Health | None = None
    shm_size: str | None = None
    host_network: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    stop_timeout_s: int = 30

    @property
    def container_name(self) -> str:
        return f"fleet-{self.name}"


# Model loading time differs by backend: vLLM downloads and compiles.
START_PERIOD_S = {"vllm": 900, "ollama": 120, "llamacpp": 300}
CACHE_VOLUMES = {"vllm": "fleet-hf-cache", "ollama": "fleet-ollama", "llamacpp": "fleet-llamacpp-cache"}


def host_containers(plan: Plan, host: str) -> list[Container]:
    """Every container of ``host``: its workers, then the gateway's services if it is the gateway."""
    out = [worker_container(plan, w) for w in plan.workers_on(host)]
    if host == plan.fleet.gateway.host:
        out += gateway_containers(plan)
    return out


def worker_container(plan: Plan, worker: Worker) -> Container:
    fleet = plan.fleet
    model = plan.model(worker.model)
    backend = backends.get(worker.backend)
    env = dict(backend.container_env(worker, model))
    volumes = [Volume(CACHE_VOLUMES[worker.backend], backend.cache_dir)]
    secrets: list[tuple[str, str, str]] = []
    if worker.backend == "llamacpp":
        assert isinstance(backend, LlamaCpp)
        _, mount = backend.model_location(model)
        if mount is not None:
            volumes.append(Volume(mount, "/models", read_only=True))
    if worker.backend == "vllm" and fleet.secrets.hf_token_file:
        secrets.append((HF_TOKEN_SECRET, fleet.secrets.hf_token_file, HF_TOKEN_TARGET))
        env["HF_TOKEN_PATH"] = HF_TOKEN_TARGET  # a path, never the token itself
    health = Health(cmd=backend.healthcheck(), start_period_s=START_PERIOD_S[worker.backend])
    gpus = ", ".join(f"{g.label} {g.uuid}" for g in worker.gpus) or "cpu"
    return Container(
        name=worker.name,
        description=f"fleet {fleet.name}: {worker.backend} worker for {worker.model} on {gpus}",
        image=backend.image(fleet, worker),
        args=backend.container_args(worker, model),
        env=dict(sorted(env.items())),
        devices=[g.cdi for g in worker.gpus],
        ports=[(worker.address, worker.port, backend.container_port)],
        volumes=volumes,
        secrets=secrets,
        health=health,
        shm_size="8g" if worker.backend == "vllm" else None,
        labels={
            "io.fleet.fleet": fleet.name,
            "io.fleet.worker": worker.name,
            "io.fleet.model": worker.model,
            "io.fleet.gpus": ",".join(g.uuid for g in worker.gpus),
        },
    )


def gateway_containers(plan: Plan) -> list[Container]:
    """Envoy, Caddy and the gatekeeper on the gateway host.

    They use the host's network: Caddy serves the public ports, Envoy and
    the gatekeeper listen on loopback only (see the rendered configs), and
    Envoy reaches workers over the mesh.
    """
    fleet = plan.fleet
    gw = fleet.gateway
    labels = {"io.fleet.fleet": fleet.name, "io.fleet.role": "gateway"}
    secrets: list[tuple[str, str, str]] = []
    if fleet.auth.oidc is not None:
        secrets.append(
            ("fleet-oidc-client-secret", fleet.auth.oidc.client_secret_file, "/run/secrets/oidc_client_secret")
        )
    return [
        Container(
            name="envoy",
            description=f"fleet {fleet.name}: Envoy, model routing and health-checked upstreams",
            image=fleet.images.envoy,
            args=[
                "-c",
                "/etc/envoy/envoy.yaml",
                "--drain-time-s",
                "60",
                "--drain-strategy",
                "immediate",
                "--file-flush-interval-msec",
                "1000",  # the usage log reaches the ledger within a second
            ],
            volumes=[
                Volume(f"{CONFIG_DIR}/envoy/envoy.yaml", "/etc/envoy/envoy.yaml", read_only=True),
                Volume("/var/log/fleet", "/var/log/fleet"),  # the usage log, read by the gatekeeper
            ],
            health=Health(
                cmd=["CMD", "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{gw.ports.envoy_admin}"], start_period_s=10
            ),
            host_network=True,
            labels={**labels, "io.fleet.service": "envoy"},
            stop_timeout_s=70,
        ),
        Container(
            name="gatekeeper",
            description=f"fleet {fleet.name}: gatekeeper, forward-auth decisions",
            image=fleet.images.gatekeeper,
            args=[
                "fleet-gatekeeper",
                "--spec",
                "/etc/fleet/fleet.yaml",
                "--state-dir",
                "/var/lib/fleet",
                "--usage-log",
                "/var/log/fleet/usage.log",
                "--host",
                "127.0.0.1",
                "--port",
                str(gw.ports.gatekeeper),
            ],
            volumes=[
                Volume("fleet-gatekeeper-state", "/var/lib/fleet"),
                Volume("/var/log/fleet", "/var/log/fleet", read_only=True),
                Volume(f"{CONFIG_DIR}/fleet.yaml", "/etc/fleet/fleet.yaml", read_only=True),
            ],
            secrets=secrets,
            health=Health(
                cmd=[
                    "CMD",
                    "python3",
                    "-c",
                    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{gw.ports.gatekeeper}/healthz', timeout=2)",
                ],
                start_period_s=10,
            ),
            host_network=True,
            labels={**labels, "io.fleet.service": "gatekeeper"},
        ),
        Container(
            name="caddy",
            description=f"fleet {fleet.name}: Caddy, TLS front door",
            image=fleet.images.caddy,
            args=["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"],
            volumes=[
                Volume(f"{CONFIG_DIR}/caddy/Caddyfile", "/etc/caddy/Caddyfile", read_only=True),
                Volume("fleet-caddy-data", "/data"),
            ],
            health=Health(
                cmd=["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{gw.ports.caddy_admin}/config/"],
                start_period_s=10,
            ),
            host_network=True,
            labels={**labels, "io.fleet.service": "caddy"},
        ),
    ]
