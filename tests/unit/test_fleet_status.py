"""`controller status SPEC` (controller/deploy/status.py): made-up probe documents -> rows, the mesh matrix and the
problems; the probe script itself on this machine; the CLI's shape. The real thing over SSH is
tests/multihost/test_status.py."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from controller.cli.status import print_report, report_tables
from controller.deploy import bundle
from controller.deploy import status as st
from controller.deploy.ansible import SCRIPT_MARKER, HostResult, script_doc
from controller.plan import make_plan
from controller.plan.models import Plan
from controller.render.containers import SPEC_PATH
from controller.spec import load_spec
from tests.conftest import ROOT

HOMELAB = ROOT / "examples" / "homelab.yaml"
VERSION = "ab" * 32
PROBE = ROOT / "ansible" / "files" / "status_probe.py"


@pytest.fixture(scope="module")
def plan() -> Plan:
    return make_plan(load_spec(HOMELAB))


def key(host: str) -> str:
    return f"KEY-{host}="


def healthy(plan: Plan, pinning: str = "ok") -> dict[str, dict[str, Any]]:
    """Per host, what the probe says on a fleet deployed at ``VERSION`` with everything up."""
    now = float(int(time.time()))
    docs = {}
    for h in plan.fleet.hosts or []:
        workers = plan.workers_on(h.name)
        services = {w.name: "d" for w in workers}
        if st.has_agent(plan, h.name):
            services["agent"] = "d"
        if h.name == plan.fleet.gateway.host:
            services |= {"envoy": "d", "gatekeeper": "d"}
        others = [o for o in plan.fleet.hosts or [] if o.name != h.name]
        agent = None
        if st.has_agent(plan, h.name):
            agent = {
                "url": st.agent_url(plan, h.name),
                "ok": True,
                "seconds": 0.02,
                "status": {
                    "host": h.name,
                    "nvml": {
                        "up": pinning == "ok",
                        "reason": None if pinning == "ok" else "libnvidia-ml.so.1 not found",
                    },
                    "gpus": [],
                    "missing_gpus": [],
                    "workers": [
                        {
                            "name": w.name,
                            "gpus": [g.uuid for g in w.gpus],
                            "pinning": pinning,
                            "pinning_reason": "processes on planned GPUs only"
                            if pinning == "ok"
                            else "cannot tell: NVML down (libnvidia-ml.so.1 not found)",
                            "health": {
                                "url": f"http://{w.address}:{w.port}/health",
                                "up": True,
                                "latency_seconds": 0.004,
                            },
                        }
                        for w in workers
                    ],
                },
            }
        docs[h.name] = {
            "now": now,
            "manifest": {
                "fleet": plan.fleet.name,
                "files": {SPEC_PATH: VERSION},
                "services": services,
                "deployed_at": "2026-12-02T10:00:00Z",
                "by": "ops@laptop",
            },
            "manifest_error": None,
            "engine": "podman",
            "engine_error": None,
            "containers": [{"name": f"fleet-{s}", "state": "running"} for s in sorted(services)],
            "agent": agent,
            "tcp": {
                o.name: {"address": str(o.address), "port": st.mesh_port(plan, o.name)[0], "ok": True, "seconds": 0.001}
                for o in others
            },
            "wireguard": {
                "exists": True,
                "up": True,
                "public_key": key(h.name),
                "peers": {
                    key(o.name): {"endpoint": f"{o.name}:51820", "latest_handshake": int(now) - 5} for o in others
                },
            },
        }
    return docs


def run(plan: Plan, docs: dict[str, dict[str, Any]], down: dict[str, str] | None = None) -> st.Report:
    probes = {name: st.HostProbe(True, doc) for name, doc in docs.items()}
    for name, why in (down or {}).items():
        probes[name] = st.HostProbe(False, None, why)
    keys = {h.name: key(h.name) for h in plan.fleet.hosts or []}  # the controller's, from its state folder
    return st.report(plan, "fleet.yaml", VERSION, probes, keys)


def text(rep: st.Report) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    for table in report_tables(rep):
        console.print(table)
    return console.export_text()


def test_a_healthy_fleet_is_all_ok(plan: Plan) -> None:
    rep = run(plan, healthy(plan))
    assert rep.problems == [] and rep.exit_code == 0, rep.problems
    assert [(h["name"], h["ssh"], h["deployed"]["current"]) for h in rep.hosts] == [
        ("gateway", "ok", True),
        ("tower", "ok", True),
        ("den", "ok", True),
    ]
    assert all(h["containers"]["running"] == h["containers"]["total"] > 0 for h in rep.hosts)
    assert len(rep.mesh) == 6 and {p["verdict"] for p in rep.mesh} == {"ok"}
    assert {(w["worker"], w["health"], w["pinning"], w["current"]) for w in rep.workers} == {
        (w.name, "up", "ok", True) for w in plan.workers
    }
    for w in rep.workers:
        assert w["agent_gpus"] == [g["uuid"] for g in w["gpus"]]
        assert w["latency_ms"] == 4.0
    data = json.loads(json.dumps(rep.as_dict()))  # all of it is data
    assert data["ok"] is True and data["spec_sha256"] == VERSION
    assert "TCP connect" in data["mesh"]["method"] and "handshake" in data["mesh"]["method"]
    table = text(rep)
    assert re.search(r"tower\s+ok\s+current 2026-12-02T10:00:00Z\s+4/4 running\s+ok", table), table
    assert re.search(r"den\s+ok\s+ok\s+-", table), table  # the mesh matrix's den row
    assert "processes" not in table


def test_pinning_unknown_is_shown_as_unknown_and_not_a_failure(plan: Plan) -> None:
    rep = run(plan, healthy(plan, pinning="unknown"))
    assert rep.problems == [] and rep.exit_code == 0
    assert {w["pinning"] for w in rep.workers} == {"unknown"}
    assert all("NVML down" in w["pinning_reason"] for w in rep.workers)
    assert len(rep.notes) == 2  # tower and den
    assert all("not counted as a failure" in n and "NVML down" in n for n in rep.notes)
    assert re.search(r"\bunknown\b", text(rep))
    assert all(h["agent"]["nvml"]["up"] is False for h in rep.hosts if h["agent"])


def test_an_unreachable_host_is_a_problem_and_its_pairs_are_not_guessed(plan: Plan) -> None:
    docs = healthy(plan)
    for name in ("gateway", "tower"):
        docs[name]["tcp"]["den"] |= {"ok": False, "error": "timed out"}
    rep = run(plan, docs, down={"den": "ssh: connect to host den.home.arpa port 22: Connection refused"})
    assert rep.exit_code == 1
    assert rep.problems[0].startswith("den: unreachable over SSH (ops@den.home.arpa): ssh: connect"), rep.problems
    den_workers = [w for w in rep.workers if w["host"] == "den"]
    assert den_workers and all(w["health"] == "unknown" and w["current"] is None for w in den_workers)
    verdicts = {(p["from"], p["to"]): p["verdict"] for p in rep.mesh}
    assert verdicts[("den", "gateway")] == verdicts[("den", "tower")] == "unknown"
    assert verdicts[("gateway", "den")] == verdicts[("tower", "den")] == "unreachable"
    mesh_problems = [p for p in rep.problems if p.startswith("mesh")]
    assert mesh_problems == [
        "mesh gateway -> den: unreachable (TCP 10.77.0.3:9400: timed out; handshake 5 s ago)",
        "mesh tower -> den: unreachable (TCP 10.77.0.3:9400: timed out; handshake 5 s ago)",
    ]


def test_a_host_whose_mesh_interface_is_down_has_all_its_pairs_down(plan: Plan) -> None:
    docs = healthy(plan)
    docs["den"]["wireguard"]["up"] = False
    for name, doc in docs.items():
        for peer, tcp in doc["tcp"].items():
            if "den" in (name, peer):
                tcp |= {"ok": False, "error": "timed out" if peer == "den" else "Network is unreachable"}
    rep = run(plan, docs)
    assert rep.exit_code == 1
    down = {(p["from"], p["to"]) for p in rep.mesh if p["verdict"] != "ok"}
    assert down == {("den", "gateway"), ("den", "tower"), ("gateway", "den"), ("tower", "den")}
    assert "mesh den -> gateway: unreachable (fleet0 is down on den; TCP 10.77.0.1:443: Network is unreachable" in (
        "\n".join(rep.problems)
    )
    assert not [p for p in rep.problems if not p.startswith("mesh")], rep.problems


def test_a_pair_without_a_tcp_port_is_judged_by_its_handshake(plan: Plan) -> None:
    docs = healthy(plan)
    del docs["tower"]["tcp"]["gateway"]
    rep = run(plan, docs)
    pair = next(p for p in rep.mesh if (p["from"], p["to"]) == ("tower", "gateway"))
    assert (pair["verdict"], pair["handshake_age_s"]) == ("ok", 5)
    stale = copy.deepcopy(docs)
    stale["tower"]["wireguard"]["peers"][key("gateway")]["latest_handshake"] = int(time.time()) - 400
    rep = run(plan, stale)
    assert rep.problems == ["mesh tower -> gateway: no handshake (handshake 400 s ago)"]
    stale["tower"]["wireguard"]["peers"][key("gateway")]["latest_handshake"] = 0
    assert run(plan, stale).problems == ["mesh tower -> gateway: no handshake (never a handshake)"]
    del stale["tower"]["wireguard"]["peers"][key("gateway")]
    assert run(plan, stale).problems == [
        "mesh tower -> gateway: no handshake (gateway is not a peer of fleet0 on tower)"
    ]


def test_the_controllers_public_keys_name_the_peers_when_given(plan: Plan) -> None:
    docs = healthy(plan)
    del docs["tower"]["tcp"]["gateway"]
    probes = {n: st.HostProbe(True, d) for n, d in docs.items()}
    rep = st.report(plan, "fleet.yaml", VERSION, probes, {"gateway": "ROTATED="})  # the host still has the old key
    assert rep.problems == ["mesh tower -> gateway: no handshake (gateway is not a peer of fleet0 on tower)"]


def test_an_older_deploy_and_a_missing_manifest_are_problems(plan: Plan) -> None:
    docs = healthy(plan)
    docs["tower"]["manifest"]["files"][SPEC_PATH] = "cd" * 32
    docs["den"]["manifest"] = None
    docs["den"]["containers"] = []
    rep = run(plan, docs)
    assert rep.problems == [
        "tower: runs spec cdcdcdcdcdcd (deployed 2026-12-02T10:00:00Z by ops@laptop), not the current abababababab; "
        "run `controller deploy SPEC`",
        "den: not deployed (no /var/lib/fleet/deploy/manifest.json); run `controller deploy SPEC`",
    ]
    assert {w["current"] for w in rep.workers if w["host"] == "tower"} == {False}
    assert "OLD cdcdcdcdcdcd" in text(rep)


def test_workers_down_pinned_wrong_or_missing_and_containers_stopped_are_problems(plan: Plan) -> None:
    docs = healthy(plan)
    tower = docs["tower"]
    first, second, *_ = tower["agent"]["status"]["workers"]
    first["health"] = {"url": "http://10.77.0.2:8100/health", "up": False, "latency_seconds": None, "error": "HTTP 503"}
    second |= {"pinning": "wrong_gpu", "pinning_reason": "processes on GPU-x; planned: GPU-y"}
    den_worker = docs["den"]["agent"]["status"]["workers"].pop()
    docs["den"]["containers"][0]["state"] = "exited"
    gone = docs["den"]["containers"].pop()
    rep = run(plan, docs)
    assert rep.problems == [
        f"tower: worker {first['name']} is down (HTTP 503 at http://10.77.0.2:8100/health)",
        f"tower: worker {second['name']} GPU pinning wrong_gpu: processes on GPU-x; planned: GPU-y",
        f"den: container {docs['den']['containers'][0]['name']} is exited; see `podman logs "
        f"{docs['den']['containers'][0]['name']}` there",
        f"den: container {gone['name']} (deployed) does not exist; run `controller deploy SPEC`",
        f"den: worker {den_worker['name']} is not among the agent's workers (the deployed spec differs?); "
        "run `controller deploy SPEC`",
    ]
    den = next(h for h in rep.hosts if h["name"] == "den")
    assert (den["containers"]["running"], den["containers"]["total"]) == (0, 2)  # its agent and its one worker


def test_an_agent_that_does_not_answer_leaves_its_workers_unknown(plan: Plan) -> None:
    docs = healthy(plan)
    docs["den"]["agent"] = {"url": "http://10.77.0.3:9400/status", "ok": False, "error": "URLError: refused"}
    rep = run(plan, docs)
    assert rep.problems == [
        "den: agent at http://10.77.0.3:9400/status did not answer (URLError: refused); its workers' health is unknown"
    ]
    assert {w["health"] for w in rep.workers if w["host"] == "den"} == {"unknown"}


def test_ansible_results_become_probes() -> None:
    doc = {"manifest": None}
    results = {
        "a": HostResult(ok=False, unreachable=True, failed_task="status", message="ssh: Connection refused"),
        "b": HostResult(ok=False, failed_task="status", message="python3: not found"),
        "c": HostResult(results={"status": {"stdout": "oops"}}),
        "d": HostResult(results={"status": {"stdout": f"a warning\r\n{SCRIPT_MARKER} {json.dumps(doc)}\r\n"}}),
    }
    probes = st.from_results(results)
    assert probes["a"] == st.HostProbe(False, None, "ssh: Connection refused")
    assert probes["b"] == st.HostProbe(True, None, "the status probe failed: python3: not found")
    assert probes["c"] == st.HostProbe(
        True, None, f"the status probe printed no document (no {SCRIPT_MARKER} line): 'oops'"
    )
    assert probes["d"] == st.HostProbe(True, doc, "")


def test_probe_args_name_each_peer_and_the_port_it_serves_on_the_mesh(plan: Plan) -> None:
    args = st.probe_args(plan, "tower")
    assert args["agent"] == "http://10.77.0.2:9400/status"
    assert args["interface"] == "fleet0" and args["manifest"] == bundle.MANIFEST
    assert args["peers"] == [
        {"name": "gateway", "address": "10.77.0.1", "port": 443},
        {"name": "den", "address": "10.77.0.3", "port": 9400},
    ]
    assert st.probe_args(plan, "gateway")["agent"] is None


def test_the_probe_script_runs_on_this_machine(tmp_path: Path) -> None:
    """ansible/files/status_probe.py with this machine's Python, as Ansible's `script` runs it on a host."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"fleet": "f", "files": {SPEC_PATH: VERSION}}))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        closed = socket.create_server(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        args = {
            "fleet": "f",
            "manifest": str(manifest),
            "engine": "no-such-engine",
            "interface": "fleet-none0",
            "agent": f"http://127.0.0.1:{closed_port}/status",
            "peers": [
                {"name": "up", "address": "127.0.0.1", "port": port},
                {"name": "down", "address": "127.0.0.1", "port": closed_port},
                {"name": "untested", "address": "127.0.0.1", "port": None},
            ],
            "timeout_s": 2,
        }
        arg = base64.b64encode(json.dumps(args).encode()).decode()
        out = subprocess.run([sys.executable, str(PROBE), arg], capture_output=True, text=True, timeout=30, check=True)
    doc = script_doc(out.stdout, "the status probe")  # as the controller reads it
    assert doc["manifest"]["files"][SPEC_PATH] == VERSION
    assert doc["engine_error"] == "no-such-engine not installed" and doc["containers"] == []
    assert doc["tcp"]["up"]["ok"] is True
    assert doc["tcp"]["down"]["ok"] is False and doc["tcp"]["down"]["error"]
    assert set(doc["tcp"]) == {"up", "down"}
    assert doc["agent"]["ok"] is False and doc["agent"]["url"].endswith("/status")
    assert doc["wireguard"] == {"exists": False, "up": False, "error": "no interface fleet-none0"}


def test_print_report_lists_each_problem_on_its_own_line(plan: Plan, capsys: pytest.CaptureFixture[str]) -> None:
    docs = healthy(plan, pinning="unknown")
    rep = run(plan, docs, down={"den": "timeout"})
    print_report(rep)
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: {p}" for p in rep.problems] and len(problems) == 1
    assert "note: tower: GPU pinning unknown for 3 worker(s)" in out
    assert "mesh checked by: TCP connect" in out
    assert out.rstrip().endswith("1 problem(s)")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_fleet_options_without_a_spec_are_a_usage_error() -> None:
    result = cli("status", "--fleet")
    assert result.returncode == 2, result.stderr
    assert "need the fleet's SPEC" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_the_cli_over_ssh_to_hosts_that_refuse(tmp_path: Path) -> None:
    """The whole path (playbook, parse, report, exit code) against SSH targets that refuse at once."""
    spec = re.sub(r"ssh: \S+", "ssh: root@127.0.0.1:1", HOMELAB.read_text())
    (tmp_path / "fleet.yaml").write_text(spec)
    began = time.monotonic()
    result = cli("status", str(tmp_path / "fleet.yaml"), "--fleet", "--json", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1, result.stderr
    out = json.loads(result.stdout)
    assert [h["ssh"] for h in out["hosts"]] == ["unreachable"] * 3
    assert [p.split(":")[0] for p in out["problems"]] == ["gateway", "tower", "den"]
    assert all("unreachable over SSH (root@127.0.0.1:1)" in p for p in out["problems"])
    assert {p["verdict"] for p in out["mesh"]["pairs"]} == {"unknown"}
    assert not (tmp_path / "state").exists()  # read-only: no keys, no lock, no audit line
    print(f"status of 3 refusing hosts: {time.monotonic() - began:.1f}s")
