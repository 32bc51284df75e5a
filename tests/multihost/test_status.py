"""`controller status SPEC --fleet` on the deployed fake fleet (tests/multihost/), from the laptop, over SSH.

The fleet as `fleet.spec` describes it (deployed again first: the deploy tests before this module deploy other
specs) is all well: every host reachable and at the spec's version, every mesh pair ok, every worker healthy on
its planned GPU. The fake hosts have no NVML, so GPU pinning is "unknown" with the agent's reason, noted and not a
failure. Then gpu2's WireGuard interface goes down: status names gpu2's four pairs and exits 1; once it is up
again, the mesh is ok again.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from controller.plan import make_plan
from controller.spec import load_spec
from tests.multihost.fleet import Deploy, Fleet, controller

pytestmark = [pytest.mark.multihost]

HOSTS = ("gateway", "gpu1", "gpu2")


def _status(fleet: Fleet, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    result = controller(
        "status",
        str(fleet.spec),
        "--fleet",
        "--ssh-config",
        str(fleet.hosts.ssh_config),
        "--state-dir",
        str(fleet.state),
        *extra,
        timeout=300,
    )
    return result, time.monotonic() - began


def _json(fleet: Fleet) -> tuple[int, dict[str, Any], float]:
    result, took = _status(fleet, "--json")
    try:
        out = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"status --json printed no JSON (rc {result.returncode}): {result.stderr[-2000:]}")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, out, took


def _pairs(out: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(p["from"], p["to"]): p["verdict"] for p in out["mesh"]["pairs"]}


@pytest.fixture(scope="module")
def at_spec(fleet: Fleet, deployed: Deploy) -> Deploy:
    """The fleet at `fleet.spec` (a no-change deploy when it already is)."""
    again = fleet.deploy("--yes")
    assert again.rc == 0, f"{again.stderr[-3000:]}\n{json.dumps(again.out, indent=1)[-3000:]}"
    return again


@pytest.mark.timeout(600)
def test_status_of_the_deployed_fleet_is_all_ok(fleet: Fleet, at_spec: Deploy, note: Callable[[str], None]) -> None:
    rc, out, took = _json(fleet)
    note(f"fleet status of 3 hosts: {took:.1f}s wall (the probe itself {out['seconds']:.1f}s)")
    assert out["problems"] == [] and rc == 0, json.dumps(out, indent=1)[-4000:]
    assert [h["name"] for h in out["hosts"]] == list(HOSTS)
    for h in out["hosts"]:
        assert h["ssh"] == "ok", h
        assert h["deployed"]["current"] is True and h["deployed"]["spec_sha256"] == out["spec_sha256"], h
        assert h["containers"]["running"] == h["containers"]["total"] > 0, h
    assert len(out["mesh"]["pairs"]) == 6
    assert set(_pairs(out).values()) == {"ok"}, out["mesh"]["pairs"]
    # every pair was proven by a TCP connect over the mesh (agents on the GPU hosts, Envoy's HTTPS on the gateway)
    assert all(p["tcp"] and p["tcp"]["ok"] for p in out["mesh"]["pairs"]), out["mesh"]["pairs"]
    assert all(p["handshake_age_s"] is not None and p["handshake_age_s"] <= 180 for p in out["mesh"]["pairs"])
    plan = make_plan(load_spec(fleet.spec))
    planned = {w.name: (w.host, [g.uuid for g in w.gpus]) for w in plan.workers}
    assert {w["worker"]: (w["host"], w["agent_gpus"]) for w in out["workers"]} == planned
    assert planned[next(w.name for w in plan.workers if w.model == "tiny-embed")][1] == [
        fleet.hosts["gpu1"].gpus[1].uuid
    ]
    for w in out["workers"]:
        assert w["health"] == "up" and w["latency_ms"] is not None, w
        assert w["current"] is True, w
        # No NVML on the fake hosts: the agent cannot tell, and says why; a real GPU host says ok.
        assert w["pinning"] in ("ok", "unknown"), w
        if w["pinning"] == "unknown":
            assert "NVML" in w["pinning_reason"], w
    if any(w["pinning"] == "unknown" for w in out["workers"]):
        note("GPU pinning: unknown on the fake hosts (no NVML), shown as such and not counted as a failure")
        assert {n.split(":")[0] for n in out["notes"]} == {"gpu1", "gpu2"}, out["notes"]
        assert all("not counted as a failure" in n for n in out["notes"])
    human, _ = _status(fleet)
    print(human.stdout)
    assert human.returncode == 0, human.stdout + human.stderr
    assert human.stdout.rstrip().endswith("all ok"), human.stdout
    if out["notes"]:
        assert "note: gpu1: GPU pinning unknown" in human.stdout, human.stdout


@pytest.mark.timeout(600)
def test_a_cut_mesh_path_is_named_and_comes_back(fleet: Fleet, at_spec: Deploy) -> None:
    iface = make_plan(load_spec(fleet.spec)).fleet.mesh.interface
    gpu2 = fleet.hosts["gpu2"]  # SSH is on the underlay: the host stays reachable with its mesh interface down
    gpu2_pairs = {(a, b) for a in HOSTS for b in HOSTS if a != b and "gpu2" in (a, b)}
    try:
        gpu2.run(f"ip link set {iface} down")
        rc, out, _ = _json(fleet)
        assert rc == 1, json.dumps(out, indent=1)[-3000:]
        pairs = _pairs(out)
        assert {p for p, v in pairs.items() if v != "ok"} == gpu2_pairs, out["mesh"]["pairs"]
        assert all(pairs[p] == "unreachable" for p in gpu2_pairs), out["mesh"]["pairs"]
        mesh_problems = sorted(p for p in out["problems"] if p.startswith("mesh "))
        assert [p.split(":")[0] for p in mesh_problems] == sorted(f"mesh {a} -> {b}" for a, b in gpu2_pairs)
        assert any(f"{iface} is down on gpu2" in p for p in mesh_problems), mesh_problems
        # anything else wrong is gpu2's own (its agent listens on the mesh address that just went away)
        assert all(p.startswith(("mesh ", "gpu2: ")) for p in out["problems"]), out["problems"]
        assert {h["name"]: h["ssh"] for h in out["hosts"]} == dict.fromkeys(HOSTS, "ok")
        human, _ = _status(fleet)
        print(human.stdout)
        assert human.returncode == 1
        lines = human.stdout.splitlines()
        assert "problem: mesh gateway -> gpu2: unreachable" in "\n".join(lines), human.stdout
        assert re.fullmatch(r"\d+ problem\(s\)", lines[-1]), human.stdout
    finally:
        gpu2.run(f"ip link set {iface} up", check=False)
    deadline = time.monotonic() + 120
    while True:
        rc, out, _ = _json(fleet)
        if rc == 0 and set(_pairs(out).values()) == {"ok"}:
            print(f"the mesh was back {120 - (deadline - time.monotonic()):.0f} s after {iface} came up on gpu2")
            break
        assert time.monotonic() < deadline, f"the mesh did not come back: {out['problems']}"
        time.sleep(3)
