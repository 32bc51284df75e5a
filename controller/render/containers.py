"""One description of every container a host runs, shared by Compose and Quadlet.

The Compose and Quadlet renderers only translate these specs into their
formats, so the two outputs cannot drift apart in what they run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field

from controller import backends
from controller.backends.llamacpp import LlamaCpp
from controller.plan.models import Plan, Worker
from controller.render import guard
from controller.render.envoy import EDS_FOLDER, FRONT_SOCKET, RUN_ARGS, SECRETS_DIR, TLS_DIR, XDS_FOLDER
from controller.secrets import KEY_FILE
from controller.spec.models import Fleet

HF_TOKEN_SECRET = "fleet-hf-token"
# The worker secret (controller/secrets.py), which deploy puts in each host's secrets folder: workers require
# it, Prometheus sends it when it scrapes them, Envoy adds it to every request it sends them.
SECRETS_HOST_DIR = "/etc/fleet/secrets"
WORKER_KEY = ("fleet-worker-key", f"{SECRETS_HOST_DIR}/{KEY_FILE}", "/run/secrets/worker_key")
HF_TOKEN_TARGET = "/run/secrets/hf_token"
CONFIG_DIR = "/etc/fleet"  # where deploy puts each host's rendered files
# The spec as loaded, where deploy puts it; the folder is mounted (not the file), so a spec replaced by a rename
# shows through to the gatekeeper, which reloads users, groups and models from it in place.
SPEC_DIR = f"{CONFIG_DIR}/spec"
SPEC_PATH = f"{SPEC_DIR}/fleet.yaml"

# The gateway's monitoring services, on loopback only (reach Grafana through an
# SSH tunnel). Not 9090: that is the gatekeeper's default port.
# Where the agent finds the container engine's API (Docker's or podman's
# compatible one) to name the container behind a GPU process.
ENGINE_SOCKET = "/run/podman/podman.sock"
HOST_ENGINE_SOCKET = {"compose": "/var/run/docker.sock", "quadlet": "/run/podman/podman.sock"}


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
    entrypoint: list[str] = field(default_factory=list)  # empty: the image's own
    env: dict[str, str] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # CDI names
    ports: list[tuple[str, int, int]] = field(default_factory=list)  # host ip, host port, container port
    volumes: list[Volume] = field(default_factory=list)
    secrets: list[tuple[str, str, str]] = field(default_factory=list)  # name, host file, target
    health: Health | None = None
    shm_size: str | None = None
    host_network: bool = False
    host_pid: bool = False  # sees the host's processes (the agent maps GPU PIDs to containers)
    labels: dict[str, str] = field(default_factory=dict)
    stop_timeout_s: int = 30
    # Containers of the same host this one starts after (once they are healthy, where the format can say so).
    # Not a hard dependency: it keeps running when they stop.
    after: list[str] = field(default_factory=list)
    # The container of the same host whose network namespace this one joins (an Ollama worker, its guard's:
    # controller/render/guard.py). It publishes no port of its own, starts after that one and is stopped and
    # restarted with it (a restarted namespace owner has a new namespace, which this one must join again).
    network_of: str | None = None
    # Folders of files the program watches and reloads by itself (Envoy's endpoint files): a change there needs no
    # restart, so deploy leaves them out of what restarts this container.
    reloads: list[str] = field(default_factory=list)

    @property
    def container_name(self) -> str:
        return f"fleet-{self.name}"


# Model loading time differs by backend: vLLM downloads and compiles.
START_PERIOD_S = {"vllm": 900, "ollama": 120, "llamacpp": 300}
CACHE_VOLUMES = {"vllm": "fleet-hf-cache", "ollama": "fleet-ollama", "llamacpp": "fleet-llamacpp-cache"}


def host_containers(plan: Plan, host: str) -> list[Container]:
    """Every container of ``host``: its workers, its agent if it has GPUs or workers, then the gateway's services."""
    out = [c for w in plan.workers_on(host) for c in worker_containers(plan, w)]
    if plan.host(host).gpus or plan.workers_on(host):
        out.append(agent_container(plan, host))
    if host == plan.fleet.gateway.host:
        out += gateway_containers(plan)
    return out


def agent_container(plan: Plan, host_name: str) -> Container:
    """The host agent: NVML telemetry for every GPU of the host, and which worker owns which GPU process.

    It sees all the host's GPUs (CDI names, like the workers), listens on the
    mesh address only (host network, `--host`), and asks the container engine
    which container a GPU process belongs to. The socket is mounted read-only,
    which keeps the file from being replaced but does not make the engine's
    API read-only: the agent reads from it, and starts and stops the host's
    on-demand workers when the swap coordinator asks (with the worker secret).
    """
    fleet = plan.fleet
    host = plan.host(host_name)
    address = str(host.address)
    url_host = f"[{address}]" if ":" in address else address
    return Container(
        name="agent",
        description=f"fleet {fleet.name}: host agent on {host.name}, GPU telemetry and pinning checks",
        image=fleet.images.agent,
        args=[
            "fleet-agent",
            "--spec",
            SPEC_PATH,
            "--host-name",
            host.name,
            "--host",
            address,
            "--port",
            str(host.agent_port),
            "--state-dir",
            "/var/lib/fleet-agent",
            "--engine-socket",
            ENGINE_SOCKET,
        ],
        devices=[f"nvidia.com/gpu={g.uuid}" for g in host.gpus],
        # The worker secret: the bearer token of its load and unload routes (the swap coordinator sends it).
        secrets=[WORKER_KEY],
        volumes=[
            Volume("fleet-agent-state", "/var/lib/fleet-agent"),
            Volume(SPEC_DIR, SPEC_DIR, read_only=True),
            Volume(HOST_ENGINE_SOCKET[host.runtime], ENGINE_SOCKET, read_only=True),
        ],
        health=Health(
            cmd=[
                "CMD",
                "python3",
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://{url_host}:{host.agent_port}/healthz', timeout=2)",
            ],
            start_period_s=30,
        ),
        host_network=True,
        host_pid=True,  # NVML reports host PIDs; their /proc/<pid>/cgroup names the owning container
        labels={
            "io.fleet.fleet": fleet.name,
            "io.fleet.role": "agent",
            "io.fleet.service": "agent",
            "io.fleet.gpus": ",".join(g.uuid for g in host.gpus),
        },
    )


def worker_containers(plan: Plan, worker: Worker) -> list[Container]:
    """The worker's container, after its guard's where it has one (Ollama, vLLM in development mode:
    controller/render/guard.py)."""
    if guard.guarded(plan, worker):
        return [guard_container(plan, worker), worker_container(plan, worker)]
    return [worker_container(plan, worker)]


def worker_container(plan: Plan, worker: Worker) -> Container:
    """The inference server of one worker, publishing the worker's planned address and port.

    A guarded worker (Ollama, which has no authentication of its own; vLLM in development mode, whose development
    routes are outside its authentication) publishes nothing: it joins its guard's network namespace and listens
    on loopback there, so only the guard, which publishes the planned address and port and lets through only the
    gateway's requests, can reach it.
    """
    fleet = plan.fleet
    model = plan.model(worker.model)
    backend = backends.get(worker.backend)
    guarded = guard.guarded(plan, worker)
    env = dict(backend.container_env(worker, model))
    volumes = [Volume(CACHE_VOLUMES[worker.backend], backend.cache_dir)]
    # Ollama checks no secret itself: its guard does. vLLM behind a guard still checks it under /v1.
    secrets: list[tuple[str, str, str]] = [] if worker.backend == "ollama" else [WORKER_KEY]
    if worker.backend == "llamacpp":
        assert isinstance(backend, LlamaCpp)
        for mount, target in backend.model_mounts(model):  # the main model's folder, and the draft model's
            volumes.append(Volume(mount, target, read_only=True))
    if worker.backend == "vllm" and fleet.secrets.hf_token_file:
        secrets.append((HF_TOKEN_SECRET, fleet.secrets.hf_token_file, HF_TOKEN_TARGET))
        env["HF_TOKEN_PATH"] = HF_TOKEN_TARGET  # a path, never the token itself
    health = Health(cmd=backend.healthcheck(), start_period_s=START_PERIOD_S[worker.backend])
    gpus = ", ".join(f"{g.label} {g.uuid}" for g in worker.gpus) or "cpu"
    return Container(
        name=worker.name,
        description=f"fleet {fleet.name}: {worker.backend} worker for {worker.model} on {gpus}"
        + (f", reached only through fleet-{guard.guard_name(worker)}" if guarded else ""),
        image=backend.image(fleet, worker),
        args=backend.container_args(worker, model, WORKER_KEY[2]),
        entrypoint=backend.container_entrypoint(WORKER_KEY[2]),
        env=dict(sorted(env.items())),
        devices=[g.cdi for g in worker.gpus],
        ports=[] if guarded else [(worker.address, worker.port, backend.container_port)],
        volumes=volumes,
        secrets=secrets,
        health=health,
        shm_size="8g" if worker.backend == "vllm" else None,
        labels=worker_labels(plan, worker),
        network_of=guard.guard_name(worker) if guarded else None,
    )


def worker_labels(plan: Plan, worker: Worker) -> dict[str, str]:
    return {
        "io.fleet.fleet": plan.fleet.name,
        "io.fleet.worker": worker.name,
        "io.fleet.model": worker.model,
        "io.fleet.gpus": ",".join(g.uuid for g in worker.gpus),
    }


def guard_container(plan: Plan, worker: Worker) -> Container:
    """The guard of a worker whose backend cannot keep everyone but the gateway out (Ollama, which has no
    authentication; vLLM in development mode): Caddy with the worker secret.

    It owns the network namespace the worker's container joins, publishes the worker's planned address and port
    (as the worker itself would), and passes only requests carrying the worker secret (mounted here, read by
    Caddy at each request) to the worker on loopback; see controller/render/guard.py. Its health check is its
    own liveness; the worker's health (its route through the guard, which Envoy and the agent check) and the
    worker container's own check say whether the worker serves.
    """
    fleet = plan.fleet
    return Container(
        name=guard.guard_name(worker),
        description=f"fleet {fleet.name}: guard of {worker.backend} worker {worker.name}, lets only the gateway in",
        image=fleet.images.caddy,
        args=["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"],
        ports=[(worker.address, worker.port, guard.GUARD_PORT)],
        volumes=[Volume(f"{CONFIG_DIR}/{guard.config_path(worker)}", "/etc/caddy/Caddyfile", read_only=True)],
        secrets=[WORKER_KEY],
        health=wget_health(f"http://127.0.0.1:{guard.GUARD_PORT}{guard.GUARD_HEALTH_PATH}", start_period_s=10),
        labels={**worker_labels(plan, worker), "io.fleet.role": "guard"},
    )


def host_files(plan: Plan, host: str) -> dict[str, str]:
    """Files the containers of ``host`` mount besides the spec: its guards' Caddyfiles."""
    return guard.host_files(plan, host, key_file=WORKER_KEY[2])


def gateway_containers(plan: Plan) -> list[Container]:
    """Envoy, Caddy and the gatekeeper on the gateway host, then its monitoring.

    They use the host's network: Envoy serves the public HTTPS port with the
    certificate the gatekeeper publishes into the shared `fleet-tls` volume
    (from Caddy's storage, or the spec's files); Caddy serves the public HTTP
    port (ACME challenges, redirect) and keeps the certificate; the
    gatekeeper listens on loopback only; Envoy reaches workers over the mesh.
    Envoy starts once the gatekeeper is healthy, which it reports only after
    writing the (possibly still empty) SDS file Envoy's TLS listener watches.
    """
    return [*_edge_containers(plan), *swapper_containers(plan), *monitoring_containers(plan)]


def swapper_containers(plan: Plan) -> list[Container]:
    """The swap coordinator (controller/swap/), where the spec has on-demand models: on the gateway host's loopback
    beside Envoy, which asks it about on-demand workers and sends it their requests while they are not resident;
    it asks each GPU host's agent to load and unload them, with the worker secret."""
    if not plan.on_demand():
        return []
    fleet = plan.fleet
    port = fleet.gateway.ports.swapper
    view = json.dumps(
        [fleet.swap_groups, [(w.name, w.host, w.port, w.footprint_gib) for w in plan.on_demand()]],
        default=lambda o: o.model_dump(mode="json"),
        sort_keys=True,
    )
    return [
        Container(
            name="swapper",
            description=f"fleet {fleet.name}: swap coordinator, on-demand models",
            image=fleet.images.gatekeeper,  # the controller's own image
            args=[
                "python3",
                "-m",
                "controller.swap",
                "--spec",
                SPEC_PATH,
                "--secrets-dir",
                SWAPPER_SECRETS,
                "--eds-dir",
                f"/etc/envoy/{EDS_FOLDER}",
            ],
            # It plans from the spec when it starts: what it reads of it changes, it restarts.
            env={"FLEET_SWAP_VIEW_SHA256": hashlib.sha256(view.encode()).hexdigest()[:16]},
            volumes=[
                Volume(SPEC_DIR, SPEC_DIR, read_only=True),
                Volume(SECRETS_HOST_DIR, SWAPPER_SECRETS, read_only=True),  # the worker secret: the agents ask for it
                # Envoy's endpoint files: an eviction marks the worker DRAINING there first (Envoy reads it at once).
                Volume(f"{CONFIG_DIR}/envoy/{EDS_FOLDER}", f"/etc/envoy/{EDS_FOLDER}"),
            ],
            health=Health(
                cmd=[
                    "CMD",
                    "python3",
                    "-c",
                    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=2)",
                ],
                start_period_s=10,
            ),
            host_network=True,
            labels={"io.fleet.fleet": fleet.name, "io.fleet.role": "gateway", "io.fleet.service": "swapper"},
        )
    ]


SWAPPER_SECRETS = "/run/fleet-secrets"


def _edge_containers(plan: Plan) -> list[Container]:
    fleet = plan.fleet
    gw = fleet.gateway
    labels = {"io.fleet.fleet": fleet.name, "io.fleet.role": "gateway"}
    secrets: list[tuple[str, str, str]] = []
    if fleet.auth.oidc is not None:
        # Mounted where the spec names it (a relative path is beside the spec, /etc/fleet), which is where the
        # gatekeeper reads it; deploy puts the operator's file there on the gateway host.
        path = oidc_secret_path(fleet)
        secrets.append(("fleet-oidc-client-secret", path, path))
    return [
        Container(
            name="envoy",
            description=f"fleet {fleet.name}: Envoy, TLS front door, authentication, model routing",
            image=fleet.images.envoy,
            # The official image's entrypoint drops to uid 101 unless ENVOY_UID is 0; as uid 101 Envoy could not
            # read the 0600 secrets (the worker secret, the certificate the gatekeeper publishes) nor write the
            # usage log. Root inside the container, with every mount but the usage log's folder read-only.
            env={"ENVOY_UID": "0"},
            args=[
                "-c",
                "/etc/envoy/envoy.yaml",
                *RUN_ARGS,
            ],
            volumes=[
                # The folder, not the file: a file replaced by a rename shows through (Envoy watches xds/, eds/).
                Volume(f"{CONFIG_DIR}/envoy", "/etc/envoy", read_only=True),
                Volume("/var/log/fleet", "/var/log/fleet"),  # the usage log, read by the gatekeeper
                Volume("fleet-tls", TLS_DIR, read_only=True),  # the certificate, as the gatekeeper publishes it
                Volume(SECRETS_HOST_DIR, SECRETS_DIR, read_only=True),  # the worker secret (an SDS file), watched
                *_front_socket(fleet),
            ],
            health=Health(
                cmd=["CMD", "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{gw.ports.envoy_admin}"], start_period_s=10
            ),
            host_network=True,
            labels={**labels, "io.fleet.service": "envoy"},
            stop_timeout_s=70,
            reloads=[f"{CONFIG_DIR}/envoy/{XDS_FOLDER}", f"{CONFIG_DIR}/envoy/{EDS_FOLDER}"],
            # The gatekeeper writes the certificate file Envoy's TLS listener watches before it reports healthy.
            after=["gatekeeper"],
        ),
        Container(
            name="gatekeeper",
            description=f"fleet {fleet.name}: gatekeeper, authentication decisions",
            image=fleet.images.gatekeeper,
            args=[
                "fleet-gatekeeper",
                "--spec",
                SPEC_PATH,
                # The state volume is /var/lib/fleet and the gatekeeper's files are in its gatekeeper/ folder, as
                # in a local stack's state folder: an operator's `podman exec fleet-gatekeeper controller keys
                # create --state-dir /var/lib/fleet --spec /etc/fleet/spec/fleet.yaml` finds the same key store.
                "--state-dir",
                "/var/lib/fleet/gatekeeper",
                "--usage-log",
                "/var/log/fleet/usage.log",
                "--tls-dir",
                TLS_DIR,
                "--caddy-data",
                "/caddy-data",
                "--secrets-dir",  # the console's load, unload and restart go to the swapper and agents with it
                SWAPPER_SECRETS,
                "--host",
                "127.0.0.1",
                "--port",
                str(gw.ports.gatekeeper),
            ],
            volumes=[
                Volume("fleet-gatekeeper-state", "/var/lib/fleet"),
                # The usage log (read) and the console's live log (read, and cut back when it grows).
                Volume("/var/log/fleet", "/var/log/fleet"),
                Volume(SECRETS_HOST_DIR, SWAPPER_SECRETS, read_only=True),
                Volume(SPEC_DIR, SPEC_DIR, read_only=True),
                Volume("fleet-tls", TLS_DIR),
                Volume("fleet-caddy-data", "/caddy-data", read_only=True),
                *_tls_files(fleet),
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
            description=f"fleet {fleet.name}: Caddy, "
            + (
                "the front door: TLS, the gatekeeper's check, the HTTP port"
                if gw.front == "caddy"
                else "the certificate (ACME) and the HTTP port"
            ),
            image=fleet.images.caddy,
            args=["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"],
            volumes=[
                Volume(f"{CONFIG_DIR}/caddy/Caddyfile", "/etc/caddy/Caddyfile", read_only=True),
                Volume("fleet-caddy-data", "/data"),
                *_front_socket(fleet),
                *(_tls_files(fleet) if fleet.gateway.front == "caddy" else []),  # it serves the certificate itself
            ],
            health=wget_health(f"http://127.0.0.1:{gw.ports.caddy_admin}/config/", start_period_s=10),
            host_network=True,
            labels={**labels, "io.fleet.service": "caddy"},
        ),
    ]


def oidc_secret_path(fleet: Fleet) -> str:
    """The OIDC client secret's path on the gateway host and in the gatekeeper's container."""
    assert fleet.auth.oidc is not None
    return posixpath.join(CONFIG_DIR, fleet.auth.oidc.client_secret_file)  # an absolute path stays as it is


def _front_socket(fleet: Fleet) -> list[Volume]:
    """`front: caddy`: the folder of Envoy's Unix socket, shared by Envoy (which makes it, mode 0600) and Caddy."""
    if fleet.gateway.front != "caddy":
        return []
    return [Volume("fleet-front", posixpath.dirname(FRONT_SOCKET))]


def _tls_files(fleet: Fleet) -> list[Volume]:
    """`files` mode: the operator's certificate and key, for the gatekeeper to publish to Envoy."""
    tls = fleet.gateway.tls
    if tls.mode != "files" or tls.cert_file is None or tls.key_file is None:
        return []
    return [Volume(tls.cert_file, tls.cert_file, read_only=True), Volume(tls.key_file, tls.key_file, read_only=True)]


def wget_health(url: str, start_period_s: int) -> Health:
    """A health check for images that ship busybox wget but no curl (Caddy, Prometheus, Grafana)."""
    return Health(cmd=["CMD", "wget", "-q", "-O", "/dev/null", url], start_period_s=start_period_s)


def monitoring_containers(plan: Plan) -> list[Container]:
    """Prometheus, Alertmanager and Grafana on the gateway host, on loopback only.

    Each mounts its rendered folder from /etc/fleet read-only (a folder, not a
    file, so a re-rendered file shows through after an atomic rename) and keeps
    its data in a named volume.
    """
    fleet = plan.fleet
    ports = fleet.gateway.ports  # checked against each other and the host's other ports by the planner
    labels = {"io.fleet.fleet": fleet.name, "io.fleet.role": "gateway"}
    return [
        Container(
            name="prometheus",
            description=f"fleet {fleet.name}: Prometheus, metrics and alert rules",
            image=fleet.images.prometheus,
            args=[
                "--config.file=/etc/prometheus/prometheus.yml",
                "--storage.tsdb.path=/prometheus",
                "--storage.tsdb.retention.time=30d",
                f"--web.listen-address=127.0.0.1:{ports.prometheus}",
            ],
            volumes=[
                Volume(f"{CONFIG_DIR}/prometheus", "/etc/prometheus", read_only=True),
                Volume("fleet-prometheus-data", "/prometheus"),
            ],
            secrets=[WORKER_KEY],  # it scrapes the workers, which answer no one without the worker secret
            health=wget_health(f"http://127.0.0.1:{ports.prometheus}/-/ready", start_period_s=30),
            host_network=True,
            labels={**labels, "io.fleet.service": "prometheus"},
        ),
        Container(
            name="alertmanager",
            description=f"fleet {fleet.name}: Alertmanager, routes alerts to the on-call receivers",
            image=fleet.images.alertmanager,
            args=[
                "--config.file=/etc/alertmanager/alertmanager.yml",
                "--storage.path=/alertmanager",
                f"--web.listen-address=127.0.0.1:{ports.alertmanager}",
                # One instance: no gossip port (it would listen on every interface).
                "--cluster.listen-address=",
            ],
            volumes=[
                Volume(f"{CONFIG_DIR}/alertmanager", "/etc/alertmanager", read_only=True),
                Volume("fleet-alertmanager-data", "/alertmanager"),
            ],
            health=wget_health(f"http://127.0.0.1:{ports.alertmanager}/-/ready", start_period_s=30),
            host_network=True,
            labels={**labels, "io.fleet.service": "alertmanager"},
        ),
        Container(
            name="grafana",
            description=f"fleet {fleet.name}: Grafana, the on-call dashboards",
            image=fleet.images.grafana,
            env={
                "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES": "false",
                "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
                "GF_ANALYTICS_REPORTING_ENABLED": "false",
                # Loopback only: whoever reaches it has a shell or a tunnel on the gateway host.
                "GF_AUTH_ANONYMOUS_ENABLED": "true",
                "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                "GF_NEWS_NEWS_FEED_ENABLED": "false",
                "GF_PATHS_PROVISIONING": "/etc/grafana/provisioning",
                "GF_SERVER_HTTP_ADDR": "127.0.0.1",
                "GF_SERVER_HTTP_PORT": str(ports.grafana),
                "GF_USERS_ALLOW_SIGN_UP": "false",
            },
            volumes=[
                Volume(f"{CONFIG_DIR}/grafana/provisioning", "/etc/grafana/provisioning", read_only=True),
                Volume(f"{CONFIG_DIR}/grafana/dashboards", "/etc/grafana/dashboards", read_only=True),
                Volume("fleet-grafana-data", "/var/lib/grafana"),
            ],
            health=wget_health(f"http://127.0.0.1:{ports.grafana}/api/health", start_period_s=60),
            host_network=True,
            labels={**labels, "io.fleet.service": "grafana"},
        ),
    ]
