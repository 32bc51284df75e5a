"""The Quadlet path (hosts with ``runtime: quadlet``), as far as this machine allows: podman here may lack the Quadlet
generator (podman < 4.4), and the test hosts have no systemd (sshd is their PID 1), so no unit is ever started.

What runs, on a fleet of the tier's shape (tests/multihost/fleet.py) whose hosts are all Quadlet hosts on an existing
mesh (``mesh.kind: tailscale``, the hosts' underlay addresses, as examples/team.yaml's Quadlet hosts have theirs):

1. the rendered units, checked against the Compose services rendered from the same spec with ``runtime: compose``:
   the same image, entrypoint and arguments, devices, ports, mounts, secrets, environment, labels, health check and
   network; and podman's own generator (``quadlet -dryrun``) on them where this podman has it;
2. ``controller deploy --check`` against three test hosts: the unit files and services it would add;
3. the role in Ansible check mode on one host (gpu1): ``controller deploy --yes --host gpu1``, with every playbook
   that changes a host run as ``ansible-playbook --check`` (the product's own variables and playbooks; only the
   read-only probe runs for real): each task's outcome, and what check mode and the hosts' lack of systemd keep
   from running.

Every step's outcome (ran, skipped and why, failed and why, not reached) is printed under "which checks ran".
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.plan import Plan, make_plan
from controller.render import render_all
from controller.render.containers import HOST_ENGINE_SOCKET, host_containers
from controller.spec import load_spec
from tests.conftest import ROOT
from tests.contract.test_artifacts import QUADLET, parse_unit
from tests.multihost.conftest import FLEET, need_hosts
from tests.multihost.fleet import VENV_BIN, fleet_spec, write_fleet
from tests.multihost.hosts import Hosts

pytestmark = [pytest.mark.multihost]

ROLE_QUADLET = ROOT / "ansible" / "roles" / "fleet_host" / "tasks" / "quadlet.yml"
ROLE_HOST = "gpu1"  # the host the role runs on in check mode: two workers and the agent
READ_ONLY = frozenset({"probe.yml", "status.yml"})  # run for real; every other playbook under --check
# `controller deploy` in a Python of its own whose run_playbook adds --check to every playbook that changes a host
# and writes each run's results (task by task, per host) to a JSON file.
RUNNER = textwrap.dedent(
    """
    import json, sys, time
    from controller.deploy import engine

    out, args = sys.argv[1], sys.argv[2:]
    real = engine.run_playbook
    runs = []

    def run_playbook(playbook, fleet, hosts, conn, variables, host_vars=None, check=False, **kw):
        check = check or playbook not in READ_ONLY
        began = time.monotonic()
        results = real(playbook, fleet, hosts, conn, variables, host_vars, check=check, **kw)
        runs.append({
            "playbook": playbook,
            "check": check,
            "seconds": round(time.monotonic() - began, 1),
            "hosts": {
                h: {"ok": r.ok, "failed_task": r.failed_task, "message": r.message, "tasks": r.results}
                for h, r in results.items()
            },
        })
        return results

    engine.run_playbook = run_playbook
    from controller.cli import main

    sys.argv = ["controller", *args]
    try:
        main()
    finally:
        with open(out, "w") as fh:
            json.dump(runs, fh)
    """
).replace("READ_ONLY", repr(set(READ_ONLY)))


@dataclass
class QuadletFleet:
    hosts: Hosts
    folder: Path
    spec: Path
    plan: Plan
    compose_plan: Plan  # the same spec with runtime compose


def _quadlet_spec(hosts: Hosts, runtime: str) -> dict[str, Any]:
    spec = fleet_spec(hosts)
    spec["mesh"] = {"kind": "tailscale"}
    for entry, host in zip(spec["hosts"], hosts, strict=True):
        entry["address"] = host.address
        entry["runtime"] = runtime
        entry.pop("endpoint")
    return spec


@pytest.fixture(scope="module")
def quadlet_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuadletFleet]:
    need_hosts()
    folder = tmp_path_factory.mktemp("quadlet")
    with Hosts(tmp_path_factory.mktemp("ql"), FLEET) as hosts:
        path = write_fleet(folder, hosts)  # the tiny model beside it; the spec replaced below
        path.write_text(yaml.safe_dump(_quadlet_spec(hosts, "quadlet"), sort_keys=False))
        twin = write_fleet(folder / "compose", hosts)
        twin.write_text(yaml.safe_dump(_quadlet_spec(hosts, "compose"), sort_keys=False))
        yield QuadletFleet(hosts, folder, path, make_plan(load_spec(path)), make_plan(load_spec(twin)))


def _words(value: str) -> list[str]:
    """A unit file's command line, as systemd splits it (the renderer's quoting: double quotes, \\\\ and \\", $$, %%)."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(value)]


def _unit_view(text: str) -> dict[str, Any]:
    pairs = parse_unit(text)["Container"]
    values: dict[str, list[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    one = {k: v[0] for k, v in values.items()}
    entry = _words(one["Entrypoint"]) if "Entrypoint" in one else []
    networks = values.get("Network", [])
    return {
        "name": one["ContainerName"],
        "image": one["Image"],
        "command": entry + (_words(one["Exec"]) if "Exec" in one else []),
        "devices": values.get("AddDevice", []),
        "ports": values.get("PublishPort", []),
        "volumes": [v.replace(".volume:", ":", 1) for v in values.get("Volume", [])],
        "secrets": values.get("Secret", []),  # none: secrets are read-only mounts of the host's files (Volume=)
        "env": dict(_words(e)[0].split("=", 1) for e in values.get("Environment", [])),
        "labels": dict(_words(e)[0].split("=", 1) for e in values.get("Label", [])),
        "health": _words(one["HealthCmd"]) if "HealthCmd" in one else None,
        "network": networks[0] if networks else None,
        "pid_host": "--pid=host" in values.get("PodmanArgs", []),
    }


def _service_view(name: str, s: dict[str, Any], secret_files: dict[str, str]) -> dict[str, Any]:
    """A Compose service as a unit would say it: its file secrets (bind mounts of the host's file, read-only, as
    Compose makes them) among its volumes."""
    mounted = [f"{secret_files[x['source']]}:{x['target']}:ro" for x in s.get("secrets", [])]
    return {
        "name": s["container_name"],
        "image": s["image"],
        "command": [*s.get("entrypoint", []), *s.get("command", [])],
        "devices": s.get("devices", []),
        "ports": s.get("ports", []),
        "volumes": [*s.get("volumes", []), *mounted],
        "secrets": [],
        "env": s.get("environment", {}),
        "labels": s.get("labels", {}),
        "health": s["healthcheck"]["test"][1:] if "healthcheck" in s else None,
        "network": {"host": "host"}.get(s.get("network_mode", ""), s.get("network_mode")),
        "pid_host": s.get("pid") == "host",
    }


@pytest.mark.timeout(120)
def test_the_units_run_what_the_compose_services_run(
    quadlet_fleet: QuadletFleet, tmp_path: Path, note: Callable[[str], None]
) -> None:
    quadlet = render_all(quadlet_fleet.plan)
    compose = render_all(quadlet_fleet.compose_plan)
    compared = 0
    for host in quadlet_fleet.hosts:
        doc = yaml.safe_load(compose[f"{host.name}/compose.yaml"])
        services = doc["services"]
        secret_files = {name: str(v["file"]) for name, v in (doc.get("secrets") or {}).items()}
        units = {rel: text for rel, text in quadlet.items() if rel.startswith(f"{host.name}/quadlet/")}
        assert not any(rel == f"{host.name}/compose.yaml" for rel in quadlet), "a Quadlet host got a compose file"
        containers = host_containers(quadlet_fleet.plan, host.name)
        assert {f"{host.name}/quadlet/{c.container_name}.container" for c in containers} <= set(units)
        for c in containers:
            unit = _unit_view(units[f"{host.name}/quadlet/{c.container_name}.container"])
            service = _service_view(c.name, services[c.name], secret_files)
            # By design the one difference: the engine's API socket the agent mounts (Docker's path under Compose)
            for view, runtime in ((unit, "quadlet"), (service, "compose")):
                socket = HOST_ENGINE_SOCKET[runtime]
                view["volumes"] = [v.replace(f"{socket}:", "<engine socket>:", 1) for v in view["volumes"]]
            assert unit == service, f"{host.name}/{c.name}: the unit and the compose service differ"
            compared += 1
        for volume in {
            v.split(":", 1)[0]
            for c in containers
            for v in _unit_view(units[f"{host.name}/quadlet/{c.container_name}.container"])["volumes"]
            if not v.startswith("/")
        }:
            assert f"{host.name}/quadlet/{volume}.volume" in units, f"{host.name}: no unit for volume {volume}"
    note(
        f"quadlet: RAN structural check: {compared} .container units against the Compose services of the same spec "
        "(image, entrypoint+arguments, devices, ports, mounts, secrets, environment, labels, health check, network)"
    )
    if QUADLET.exists():
        for host in quadlet_fleet.hosts:
            folder = tmp_path / host.name
            folder.mkdir()
            for rel, text in quadlet.items():
                if rel.startswith(f"{host.name}/quadlet/"):
                    (folder / Path(rel).name).write_text(text)
            result = subprocess.run(
                [str(QUADLET), "-dryrun"],
                env={"QUADLET_UNIT_DIRS": str(folder), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
        note(f"quadlet: RAN {QUADLET} -dryrun on every host's units")
    else:
        version = subprocess.run(["podman", "--version"], capture_output=True, text=True, check=False).stdout.strip()
        note(
            f"quadlet: NOT RUN podman's Quadlet generator: {QUADLET} is absent ({version or 'no podman'}; "
            "it comes with podman 4.4); NOT RUN systemd-analyze verify: it checks the .service units Quadlet "
            "generates, and none can be generated here"
        )


def _deploy(fleet: QuadletFleet, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(VENV_BIN / "controller"), "deploy", str(fleet.spec), "--state-dir", str(fleet.folder / "state")]
    cmd += ["--ssh-config", str(fleet.hosts.ssh_config), "--json", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def _nothing_written(fleet: QuadletFleet) -> dict[str, str]:
    return {
        h.name: h.run(
            "find /etc/containers/systemd /etc/fleet -type f 2>/dev/null; podman ps -aq", check=False
        ).stdout.strip()
        for h in fleet.hosts
    }


@pytest.mark.timeout(300)
def test_deploy_check_names_the_units_and_changes_nothing(
    quadlet_fleet: QuadletFleet, note: Callable[[str], None]
) -> None:
    result = _deploy(quadlet_fleet, "--check")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    for host in quadlet_fleet.hosts:
        report = out["hosts"][host.name]
        assert report["result"] == "checked", report
        units = {
            f"/etc/containers/systemd/{c.container_name}.container"
            for c in host_containers(quadlet_fleet.plan, host.name)
        }
        assert units <= set(report["files"]["added"]), report["files"]
        assert sorted(report["services"]["start"]) == sorted(
            c.name for c in host_containers(quadlet_fleet.plan, host.name)
        )
    assert _nothing_written(quadlet_fleet) == dict.fromkeys((h.name for h in quadlet_fleet.hosts), "")
    note(
        "quadlet: RAN controller deploy --check on 3 Quadlet hosts (probe, preflight, diff): units and services listed, nothing written"
    )


def _outcome(result: dict[str, Any]) -> str:
    looped = result.get("results")
    items: list[dict[str, Any]] = looped if isinstance(looped, list) else [result]
    if result.get("failed"):
        msgs = [str(i.get("msg", "")) for i in items if i.get("failed")] or [str(result.get("msg", ""))]
        return "FAILED: " + " ".join(" ".join(msgs[0].split()).split(" ")[:40])
    if isinstance(looped, list) and not looped:
        return "skipped (nothing to loop over)"
    if result.get("skipped") or all(i.get("skipped") for i in items):
        why = {str(i.get("skip_reason") or i.get("msg") or "skipped") for i in items}
        return "skipped (" + "; ".join(sorted(why)) + ")"
    return "changed in check mode" if result.get("changed") else "ok"


@pytest.mark.timeout(600)
def test_the_role_in_check_mode(quadlet_fleet: QuadletFleet, tmp_path: Path, note: Callable[[str], None]) -> None:
    runs_file = tmp_path / "runs.json"
    result = subprocess.run(
        [
            str(VENV_BIN / "python"),
            "-c",
            RUNNER,
            str(runs_file),
            "deploy",
            str(quadlet_fleet.spec),
            "--yes",
            "--json",
            "--state-dir",
            str(quadlet_fleet.folder / "state"),
            "--ssh-config",
            str(quadlet_fleet.hosts.ssh_config),
            "--host",
            ROLE_HOST,  # one host is enough for the role's tasks, and the push of each file takes a while
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)},
    )
    runs = json.loads(runs_file.read_text())
    assert [r["playbook"] for r in runs][:2] == ["probe.yml", "deploy.yml"], (runs, result.stderr[-2000:])
    assert [r["check"] for r in runs] == [r["playbook"] not in READ_ONLY for r in runs]
    # quadlet.yml's tasks, their names as patterns (a templated part matches anything)
    role_tasks = [str(t["name"]) for t in yaml.safe_load(ROLE_QUADLET.read_text())]
    patterns = {t: re.compile(".*".join(re.escape(x) for x in re.split(r"\{\{.*?\}\}", t)) + "$") for t in role_tasks}
    for run in runs:
        note(f"quadlet: {run['playbook']} ({'--check' if run['check'] else 'for real, read-only'}): {run['seconds']}s")
        if not run["check"]:
            continue
        outcomes: dict[tuple[str, str], list[str]] = {}  # (task, outcome) -> hosts, in the play's order
        for host, r in run["hosts"].items():
            names = [n.removeprefix("fleet_host : ") for n in r["tasks"]]
            for name, raw in zip(names, r["tasks"], strict=True):
                outcomes.setdefault((name, _outcome(r["tasks"][raw])), []).append(host)
            for task, pattern in patterns.items():
                if not any(pattern.match(n) for n in names):
                    outcomes.setdefault((task, "NOT REACHED (the role stopped before it)"), []).append(host)
        for (task, outcome), where in outcomes.items():
            note(f"quadlet: --check {run['playbook']} [{', '.join(where)}] {task}: {outcome}")
    (deploy,) = [r for r in runs if r["playbook"] == "deploy.yml"]
    assert list(deploy["hosts"]) == [ROLE_HOST]
    for host in [quadlet_fleet.hosts[ROLE_HOST]]:
        r = deploy["hosts"][host.name]
        tasks = {n.removeprefix("fleet_host : "): v for n, v in r["tasks"].items()}
        assert _outcome(tasks["push files"]) == "changed in check mode", tasks["push files"]
        assert "systemd is not its init system" in r["message"], r
        assert (
            r["failed_task"].removeprefix("fleet_host : ")
            == "runtime quadlet needs systemd and podman's Quadlet generator"
        ), r
    out = json.loads(result.stdout)
    assert out["hosts"][ROLE_HOST]["result"] == "failed", out
    assert _nothing_written(quadlet_fleet) == dict.fromkeys((h.name for h in quadlet_fleet.hosts), "")
    assert not any(r["playbook"] == "replace.yml" for r in runs), "a worker was started on a host that failed"
    note(
        "quadlet: NOT RUN: systemctl daemon-reload, the units' restarts, replace.yml (each worker started and gated): "
        "the test hosts have no systemd, so the role's Quadlet check fails first (in check mode as a real run would), "
        "and deploy starts no worker on a failed host"
    )
