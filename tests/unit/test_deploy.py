"""controller deploy's pure parts: the bundle per host, the diff and preflight from a probe, the lock, the audit log,
the inventory. The real thing (Ansible over SSH into namespace hosts) is tests/multihost/."""

from __future__ import annotations

import base64
import copy
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.deploy import audit, bundle, diff
from controller.deploy.ansible import SCRIPT_MARKER, Connection, inventory, parse, script_doc
from controller.deploy.engine import FleetState, _bundles, _start_order, rolling_waves
from controller.deploy.lock import LockHeld, fleet_lock
from controller.errors import DeployError
from controller.plan import make_plan
from controller.render import ASSETS
from controller.render.containers import SPEC_PATH
from controller.spec import load_spec
from tests.conftest import ROOT

HOMELAB = ROOT / "examples" / "homelab.yaml"


@pytest.fixture
def homelab(tmp_path: Path) -> tuple[Any, Any, dict[str, bundle.HostBundle]]:
    loaded = load_spec(HOMELAB)
    plan = make_plan(loaded)
    return loaded, plan, _bundles(loaded, plan, FleetState.of(tmp_path, plan.fleet.name))


def probe_of(b: bundle.HostBundle, running: bool = True) -> dict[str, Any]:
    """What the probe would report on a host that holds exactly ``b`` (deployed, services running, the files it
    needs already there)."""
    return {
        "files": {**dict(b.digests), **dict.fromkeys(b.required, "present")},
        "manifest": {"files": dict(b.digests), "services": dict(b.services)},
        "containers": [{"name": f"fleet-{s}", "state": "running" if running else "exited"} for s in b.services],
        "wireguard": {"up": True},
        "tools": {"podman": "/usr/bin/podman", "compose": "/usr/bin/podman-compose"},
        "cdi_gpus": {},
        "listening": [],
    }


def test_every_host_gets_the_resolved_spec_and_its_secrets_at_0600(homelab: Any) -> None:
    _, _, bundles = homelab
    assert set(bundles) == {"gateway", "tower", "den"}
    for b in bundles.values():
        assert SPEC_PATH in b.files
        secrets = {p for p, f in b.files.items() if f.secret}
        assert secrets == {
            "/etc/fleet/secrets/worker.key",
            "/etc/fleet/secrets/worker-sds.yaml",
            "/etc/fleet/secrets/wireguard.key",
        }
        assert all(b.files[p].mode == 0o600 for p in secrets)
        # the rendered files never carry a secret's content
        for path in secrets:
            secret = b.files[path].source.read_bytes().strip() if b.files[path].source else b""
            assert secret
            for other in b.files.values():
                if not other.secret and other.source is None:
                    assert secret not in other.content, f"{path}'s content is in {other.path}"
    # the resolved spec needs no other file: no hosts file, no arch_from
    spec = bundles["tower"].files[SPEC_PATH].content
    assert b"arch_from" not in spec
    assert b"hosts_file" not in spec


def test_resolved_spec_plans_the_same(tmp_path: Path) -> None:
    loaded = load_spec(ROOT / "examples" / "team.yaml")  # it reads a hosts file
    (tmp_path / "fleet.yaml").write_text(bundle.resolved_spec(loaded))
    again = load_spec(tmp_path / "fleet.yaml")
    assert make_plan(again).workers == make_plan(loaded).workers


def test_a_changed_file_restarts_only_the_service_that_mounts_it(homelab: Any) -> None:
    _, _, bundles = homelab
    gw = bundles["gateway"]
    assert diff.changes(gw, probe_of(gw), "fleet0").empty
    probe = probe_of(gw)
    # Envoy's config as the last deploy left it differs from what the spec renders now
    old = copy.deepcopy(gw)
    old.files["/etc/fleet/envoy/envoy.yaml"] = bundle.RemoteFile("/etc/fleet/envoy/envoy.yaml", None, b"old")
    old.services = {}
    old.seal(_containers_of(old), bundle.spec_views(make_plan(load_spec(HOMELAB))))
    probe["files"] = dict(old.digests)
    probe["manifest"] = {"files": dict(old.digests), "services": dict(old.services)}
    c = diff.changes(gw, probe, "fleet0")
    assert c.files_changed == ["/etc/fleet/envoy/envoy.yaml"]
    assert c.restart == ["envoy"]
    assert not c.start and not c.remove and not c.files_added


def test_a_changed_listener_cluster_or_endpoint_file_restarts_nothing(homelab: Any) -> None:
    # Envoy watches these folders and reloads a replaced file by itself (LDS, CDS, EDS from files).
    _, _, bundles = homelab
    gw = bundles["gateway"]
    changed = ["/etc/fleet/envoy/xds/listeners.yaml", "/etc/fleet/envoy/xds/clusters.yaml"]
    changed.append(next(p for p in gw.files if p.startswith("/etc/fleet/envoy/eds/")))
    old = copy.deepcopy(gw)
    for path in changed:
        assert path in gw.files
        old.files[path] = bundle.RemoteFile(path, None, b"old")
    old.services = {}
    old.seal(_containers_of(old), bundle.spec_views(make_plan(load_spec(HOMELAB))))
    probe = probe_of(gw)
    probe["files"] = dict(old.digests)
    probe["manifest"] = {"files": dict(old.digests), "services": dict(old.services)}
    c = diff.changes(gw, probe, "fleet0")
    assert c.files_changed == sorted(changed)
    assert not c.restart and not c.start and not c.remove


def _containers_of(b: bundle.HostBundle) -> list[Any]:
    from controller.render.containers import host_containers

    return host_containers(make_plan(load_spec(HOMELAB)), b.host)


def test_stopped_missing_and_leftover_services(homelab: Any) -> None:
    _, _, bundles = homelab
    tower = bundles["tower"]
    probe = probe_of(tower)
    first = next(iter(tower.services))
    probe["containers"] = [c for c in probe["containers"] if c["name"] != f"fleet-{first}"]
    probe["containers"].append({"name": "fleet-old-model-tower-0", "state": "running"})
    probe["manifest"]["files"]["/etc/fleet/old.yaml"] = "ab"
    c = diff.changes(tower, probe, "fleet0")
    assert c.start == [first]
    assert c.remove == ["old-model-tower-0"]
    assert c.files_removed == ["/etc/fleet/old.yaml"]
    assert not c.empty
    assert any("remove  service old-model-tower-0" in line for line in c.lines())


def test_preflight_names_the_host_and_the_gpu_missing_from_the_cdi_spec(homelab: Any) -> None:
    _, plan, bundles = homelab
    tower = bundles["tower"]
    probe = probe_of(tower)
    uuids = [g.uuid for g in plan.host("tower").gpus]
    probe["cdi_gpus"] = {uuids[0]: "/etc/cdi/nvidia.yaml"}
    problems = diff.preflight(plan, tower, probe, "podman-compose")
    assert len(problems) == 1
    assert problems[0].startswith("tower: GPU " + uuids[1])
    assert "CDI" in problems[0]
    probe["cdi_gpus"][uuids[1]] = "/etc/cdi/nvidia.yaml"
    assert diff.preflight(plan, tower, probe, "podman-compose") == []


def test_preflight_runtime_memory_and_ports(homelab: Any) -> None:
    _, plan, bundles = homelab
    tower = bundles["tower"]
    probe = probe_of(tower)
    probe["cdi_gpus"] = {g.uuid: "x" for g in plan.host("tower").gpus}
    probe["tools"] = {}
    probe["smi_gpus"] = [{"uuid": g.uuid, "memory_mib": 8192} for g in plan.host("tower").gpus]
    worker = plan.workers_on("tower")[0]
    probe["listening"] = [["0.0.0.0", worker.port]]
    probe["containers"] = []
    problems = diff.preflight(plan, tower, probe, "podman-compose")
    text = "\n".join(problems)
    assert "no container runtime" in text
    assert "has 8.0 GiB, the spec says vram_gib 24" in text
    assert f"port {worker.port} on {worker.address} (worker {worker.name})" in text


def test_the_lock_names_its_holder_and_refuses(tmp_path: Path) -> None:
    lock = tmp_path / "deploy.lock"
    with fleet_lock(lock, "homelab", "deploy"):
        with pytest.raises(LockHeld) as refused, fleet_lock(lock, "homelab", "deploy", wait_s=0.3):
            pass
        assert refused.value.exit_code == 75
        assert "is being deployed by" in refused.value.message and "(pid " in refused.value.message
        assert f"pid {os.getpid()}" in refused.value.message
    with fleet_lock(lock, "homelab", "deploy"):  # released
        pass


def _hold(path: str, seconds: float) -> None:
    with fleet_lock(Path(path), "homelab", "deploy"):
        time.sleep(seconds)


def test_the_lock_waits_for_another_process_and_dies_with_it(tmp_path: Path) -> None:
    lock = tmp_path / "deploy.lock"
    ctx = multiprocessing.get_context("fork")
    holder = ctx.Process(target=_hold, args=(str(lock), 1.0))
    holder.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    started = time.monotonic()
    with fleet_lock(lock, "homelab", "deploy", wait_s=20):
        waited = time.monotonic() - started
    holder.join(10)
    assert 0.3 < waited < 15
    # a holder killed with SIGKILL leaves no lock behind
    holder = ctx.Process(target=_hold, args=(str(lock), 60))
    holder.start()
    time.sleep(0.5)
    holder.kill()
    holder.join(10)
    with fleet_lock(lock, "homelab", "deploy", wait_s=2):
        pass


def test_audit_lines_are_whole_and_kept(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    audit.append(log, {"by": "ops@laptop", "check": True})
    audit.append(log, {"by": "ops@laptop", "check": False, "hosts": {"tower": {"result": "applied"}}})
    entries = audit.read(log)
    assert [e["check"] for e in entries] == [True, False]
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_inventory_from_ssh_targets() -> None:
    fleet = load_spec(HOMELAB).fleet
    inv = inventory(fleet, ["gateway", "tower"], Connection(Path("/x/ssh_config"), Path("/x/key")))
    hosts = inv["all"]["hosts"]
    assert set(hosts) == {"gateway", "tower"}
    assert hosts["tower"]["ansible_host"] == "tower.home.arpa"
    assert hosts["tower"]["ansible_user"] == "ops"
    assert hosts["tower"]["ansible_ssh_private_key_file"] == "/x/key"
    assert "-F /x/ssh_config" in hosts["tower"]["ansible_ssh_common_args"]
    assert "BatchMode=yes" in hosts["tower"]["ansible_ssh_common_args"]
    assert hosts["tower"]["ansible_become"] is True  # ops@: root's work through sudo
    root = fleet.model_copy(update={"hosts": [h.model_copy(update={"ssh": "root@tower"}) for h in fleet.hosts or []]})
    assert "ansible_become" not in inventory(root, ["tower"], Connection())["all"]["hosts"]["tower"]


def test_vllm_hosts_need_the_hf_token_already_there(homelab: Any) -> None:
    _, _, bundles = homelab
    token = "/etc/fleet/secrets/hf_token"  # examples/homelab.yaml: secrets.hf_token_file
    assert bundles["tower"].required.get(token) == "vLLM workers: secrets.hf_token_file"
    assert token not in bundles["gateway"].required  # no vLLM worker there


def test_ansible_results_per_host() -> None:
    doc: dict[str, Any] = {
        "plays": [
            {
                "tasks": [
                    {
                        "task": {"name": "probe"},
                        "hosts": {
                            "a": {"stdout": "{}", "changed": False},
                            "b": {"unreachable": True, "msg": "ssh: connect to host b port 22: No route to host"},
                            "c": {"failed": True, "msg": "non-zero return code", "stderr": "boom\nlast line"},
                        },
                    }
                ]
            }
        ],
        "stats": {"a": {}, "b": {"unreachable": 1}, "c": {"failures": 1}},
    }
    doc["plays"][0]["tasks"].append(
        {"task": {"name": "fleet_host : rolled back"}, "hosts": {"c": {"failed": True, "msg": "step 'probe' failed"}}}
    )
    out = parse("noise before\n" + json.dumps(doc), "", ["a", "b", "c"], "probe.yml")
    assert out["a"].ok and out["a"].results["probe"]["stdout"] == "{}"
    assert not out["b"].ok and out["b"].unreachable and "No route to host" in out["b"].message
    assert not out["c"].ok and out["c"].failed_task == "probe" and out["c"].message == "step 'probe' failed"
    with pytest.raises(DeployError, match="did not run: ERROR! the playbook could not be found"):
        parse("", "ERROR! the playbook could not be found", ["a"], "probe.yml")


def run_script(name: str, args: dict[str, Any]) -> str:
    """What a script of ansible/files prints when it runs on this machine (as Ansible's `script` module runs it)."""
    encoded = base64.b64encode(json.dumps(args).encode()).decode()
    proc = subprocess.run(
        [sys.executable, str(ASSETS / "ansible" / "files" / name), encoded], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_probe_document_survives_stray_lines_and_a_terminal(tmp_path: Path) -> None:
    """The real probe.py, run here; its output as a terminal (ssh -tt) would bring it back: a warning on stderr
    merged in before it, CRLF line ends. The document is read whole; the last marker wins."""
    args: dict[str, Any] = {"fleet": "nofleet", "paths": [], "manifest": str(tmp_path / "none.json"), "interface": None}
    out = run_script("probe.py", args)
    doc = script_doc(out, "the probe")
    assert doc["hostname"] == socket.gethostname() and doc["manifest"] is None and doc["files"] == {}
    noisy = "WARNING: something on stderr\r\n" + out.replace("\n", "\r\n") + "Connection to gpu1 closed.\r\n"
    assert script_doc(noisy, "the probe") == doc
    assert script_doc(f'{SCRIPT_MARKER} {{"old": 1}}\n' + out, "the probe") == doc


def test_a_script_without_its_document_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=f"the probe printed no document \\(no {SCRIPT_MARKER} line\\): 'Traceback"):
        script_doc("Traceback (most recent call last):\n  boom\n", "the probe")
    with pytest.raises(
        ValueError, match=r"the probe printed a document that is not JSON \(Expecting value.*\): '\{\"host\":'$"
    ):
        script_doc(f'{SCRIPT_MARKER} {{"host": \n', "the probe")
    with pytest.raises(ValueError, match="the probe printed list, not a JSON object"):
        script_doc(f"{SCRIPT_MARKER} [1]\n", "the probe")
    long = "x" * 500 + "END"
    with pytest.raises(ValueError, match=r"'x{120}' … 'x{117}END'"):
        script_doc(long, "drain")
    with pytest.raises(ValueError, match=r"drain printed no document \(.*\): no output$"):
        script_doc("  \r\n", "drain")


def test_a_model_at_an_absolute_path_must_be_on_its_host(tmp_path: Path) -> None:
    loaded = load_spec(ROOT / "examples" / "workstation.yaml")
    plan = make_plan(loaded)
    bundles = _bundles(loaded, plan, FleetState.of(tmp_path, plan.fleet.name))
    path = "/var/lib/fleet/models/gemma-3-4b-it-Q4_K_M.gguf"
    assert bundles["ws"].required == {path: "model gemma-3-4b: source.gguf"}
    assert path not in bundles["ws"].files  # the host's own, not copied
    probe = probe_of(bundles["ws"])
    del probe["files"][path]  # not (yet) on the host
    probe["cdi_gpus"] = {g.uuid: "x" for g in plan.host("ws").gpus}
    problems = diff.preflight(plan, bundles["ws"], probe, "podman-compose")
    assert problems == [
        f"ws: model gemma-3-4b: source.gguf {path} is not on the host; copy it there or use a relative path"
    ]
    probe["files"][path] = "ab"
    assert diff.preflight(plan, bundles["ws"], probe, "podman-compose") == []


def test_the_oidc_secret_is_copied_from_the_controllers_machine(tmp_path: Path) -> None:
    loaded = load_spec(ROOT / "examples" / "team.yaml")
    plan = make_plan(loaded)
    with pytest.raises(
        DeployError, match=r"auth.oidc.client_secret_file: /etc/fleet/secrets/oidc_client_secret not found"
    ):
        _bundles(loaded, plan, FleetState.of(tmp_path, plan.fleet.name))


def test_services_start_after_what_they_need_once_it_is_healthy() -> None:
    # Envoy's TLS listener reads the certificate the gatekeeper publishes before it reports healthy: a deploy
    # that started Envoy first had its listener refused for good (the file it names did not exist yet).
    plan = make_plan(load_spec(HOMELAB))
    order, waits = _start_order(plan, "gateway", ["envoy", "caddy", "gatekeeper", "prometheus"])
    assert sorted(order) == ["caddy", "envoy", "gatekeeper", "prometheus"]
    assert order.index("gatekeeper") < order.index("envoy")
    assert [w["name"] for w in waits["envoy"]] == ["gatekeeper"] and waits["envoy"][0]["timeout_s"] > 60
    assert "gatekeeper" not in waits
    # Only what is being started is ordered; a dependency already running is waited for, not restarted.
    order, waits = _start_order(plan, "gateway", ["envoy"])
    assert order == ["envoy"] and [w["name"] for w in waits["envoy"]] == ["gatekeeper"]


def _rolling_fleet(tmp_path: Path, models: int) -> tuple[Any, Any, dict[str, bundle.HostBundle], dict[str, Any]]:
    """The control-plane bench's fleet shape with ``models`` GPU hosts and models (2 replicas each), deployed with
    every model at 4096 tokens of context and now asked for 8192: every replica must be replaced while serving."""
    import yaml

    from bench.control_plane import fleet_doc

    doc = fleet_doc(models)
    before = copy.deepcopy(doc)
    for m in before["models"]:
        m["context"] = 4096
    (tmp_path / "before.yaml").write_text(yaml.safe_dump(before, sort_keys=False))
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    state = FleetState.of(tmp_path / "state", doc["name"])
    old_loaded = load_spec(tmp_path / "before.yaml")
    probes = {h: probe_of(b) for h, b in _bundles(old_loaded, make_plan(old_loaded), state).items()}
    loaded = load_spec(tmp_path / "fleet.yaml")
    plan = make_plan(loaded)
    return loaded, plan, _bundles(loaded, plan, state), probes


def _assert_waves_keep_a_replica(plan: Any, waves: list[list[tuple[str, str]]]) -> None:
    for wave in waves:
        models = [plan.worker(name).model for _, name in wave]
        hosts = [host for host, _ in wave]
        assert len(set(models)) == len(models), f"two replicas of one model in a wave: {wave}"
        assert len(set(hosts)) == len(hosts), f"two workers of one host in a wave: {wave}"
        assert all(host == plan.worker(name).host for host, name in wave), wave


def test_rolling_waves_replace_one_replica_per_model_and_host_at_a_time(tmp_path: Path) -> None:
    _, plan, _, _ = _rolling_fleet(tmp_path, 6)
    drains = [(w.host, w.name) for w in plan.workers]
    assert len(drains) == 12
    waves = rolling_waves(plan, drains, 16)
    _assert_waves_keep_a_replica(plan, waves)
    assert sorted(x for wave in waves for x in wave) == sorted(drains)  # each replica once
    most_per_host = max(sum(1 for h, _ in drains if h == host) for host, _ in drains)
    assert len(waves) <= 2 * max(2, most_per_host) - 1, waves  # greedy: never worse than that, far below 12
    assert len(waves) < len(drains) / 2, waves
    bounded = rolling_waves(plan, drains, 4)
    assert all(len(w) <= 4 for w in bounded) and len(bounded) >= 3
    _assert_waves_keep_a_replica(plan, bounded)
    assert [len(w) for w in rolling_waves(plan, drains, 1)] == [1] * 12  # --parallel 1: one by one, as before
    assert [x for w in rolling_waves(plan, drains, 1) for x in w] == drains  # in the order given
    with pytest.raises(DeployError, match="--parallel 0"):
        rolling_waves(plan, drains, 0)


def test_a_rolling_update_drains_a_wave_together_and_puts_it_back_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_apply` against a recording stand-in for ansible-playbook (the real runs are tests/multihost/): each wave's
    workers leave the gateway's rotation in one drain.yml run, are replaced on their hosts in one replace.yml run,
    and come back in one more; no model is ever out of rotation with two replicas."""

    from controller.deploy import engine
    from controller.deploy.ansible import HostResult

    _, plan, bundles, probes = _rolling_fleet(tmp_path, 6)
    calls: list[tuple[str, list[str], dict[str, Any]]] = []

    def fake(
        playbook: str,
        fleet: Any,
        hosts: list[str],
        conn: Any,
        variables: dict[str, Any],
        host_vars: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, HostResult]:
        calls.append((playbook, list(hosts), variables if playbook == "drain.yml" else host_vars or {}))
        results = {h: HostResult() for h in hosts}
        if playbook == "drain.yml" and variables["fleet_drain"]:
            args = json.loads(base64.b64decode(variables["fleet_drain"]))
            drained = [{**e, "drained": True, "seconds": 0.5} for e in args["endpoints"]]
            report = {"drained": True, "seconds": 0.5, "endpoints": drained}
            results[hosts[0]].results["wait for the endpoints to drain"] = {
                "stdout": f"{SCRIPT_MARKER} {json.dumps(report)}"
            }
        return results

    monkeypatch.setattr(engine, "run_playbook", fake)
    changes = {h: diff.changes(b, probes[h], "wg-fleet") for h, b in bundles.items()}
    todo = [h for h, c in changes.items() if not c.empty]
    outcome = engine.Outcome(plan.fleet.name, False, changes)
    lines: list[str] = []
    engine._apply(
        plan,
        bundles,
        probes,
        todo,
        outcome,
        engine.FleetState(tmp_path / "s"),
        engine.Options(),
        lambda host, line: lines.append(f"{host}: {line}"),
    )
    assert not outcome.failed and sorted(outcome.applied) == sorted(todo)
    replaced = [w.name for w in plan.workers]
    sequence = [(p, h, v) for p, h, v in calls if p in {"drain.yml", "replace.yml"}]
    waves = []
    out_of_rotation: set[str] = set()
    for playbook, hosts, variables in sequence:
        if playbook == "drain.yml":
            names = {f["cluster"] for f in variables["fleet_eds_files"]}
            if variables["fleet_drain"]:
                endpoints = json.loads(base64.b64decode(variables["fleet_drain"]))["endpoints"]
                assert not out_of_rotation, "a wave drained before the last came back"
                out_of_rotation = {e["worker"] for e in endpoints}
                assert len({e["cluster"] for e in endpoints}) == len(endpoints) == len(names)
                for f in variables["fleet_eds_files"]:  # each file names its wave's worker DRAINING, no other
                    assert f["eds"].count("DRAINING") == 1, f["eds"]
            else:
                assert {envoy_cluster(plan, n) for n in out_of_rotation} == names
                out_of_rotation = set()
        else:
            names = {v["fleet_worker"]["name"] for v in variables.values()}
            assert names == out_of_rotation, "replace.yml replaced what was drained, each on its host"
            assert {plan.worker(n).host for n in names} == set(hosts)
            waves.append(sorted(out_of_rotation))
    assert not out_of_rotation, "the last wave was put back in rotation"
    assert sorted(n for w in waves for n in w) == sorted(replaced)
    assert len(waves) < len(replaced) / 2, waves  # in parallel, not one replica after another
    _assert_waves_keep_a_replica(plan, [[(plan.worker(n).host, n) for n in w] for w in waves])
    assert any("drained in 0.5 s" in line for line in lines), lines
    steps = [s["step"] for s in outcome.steps if s["step"].startswith("drain and replace")]
    assert len(steps) == len(waves)


def envoy_cluster(plan: Any, worker: str) -> str:
    from controller.render import envoy

    return envoy.model_cluster(plan.worker(worker).model)
