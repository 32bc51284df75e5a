"""The control plane at fleet scale: validate, plan, render and `deploy --check` against fleets of 10 to 1,000 hosts.

`python -m bench.control_plane [--hosts 10,50,200,1000] [--envoy 200] [--json] [--write docs/performance.md]`

Each fleet has the homelab's shape, grown: one gateway host, N GPU hosts with 4 GPUs of 24 GiB each on a WireGuard
mesh, N models (vLLM, an 8B model in FP8) with 2 replicas each, a few groups and users. Each size runs in a process
of its own (so its peak memory is its own) and reports:

- **validate**: `load_spec` (YAML, the schema's models, the cross-references);
- **plan**: `make_plan` (estimates, placement);
- **render**: `render_all` (every host's files: Compose, Envoy's xDS, Caddy, Prometheus, the agent's);
- **deploy --check**: what `controller deploy --check` computes on the operator's machine once the hosts are probed:
  every host's bundle (render, digests) and its diff against what the hosts report, here a previous deploy of the
  same fleet with one model's context changed (the probe's answers are made from that render, no SSH);
- **rolling waves**: how many waves `controller deploy` replaces every serving replica in (a rolling update of the
  whole fleet: `rolling_waves`, no two replicas of a model or workers of a host in a wave) at the default
  `--parallel 16` and unbounded; each wave costs about one drain and one worker start, whatever its size;
- **peak RSS** of the process;
- then Envoy with one size's rendered gateway configuration (`--envoy`, 200 hosts by default): `envoy --mode
  validate`, and a real start on loopback: seconds to ready, memory, clusters and endpoints.

Then the growth factor from one size to the next, and the targets of issue 17: 200 hosts plan + render ≤ 2 s,
1,000 hosts ≤ 10 s, growth from 200 to 1,000 hosts ≤ 6×.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.report import machine, publish
from controller.local import limits

SIZES = (10, 50, 200, 1000)
GPUS_PER_HOST = 4
BEGIN, END = "<!-- bench:control-plane:begin -->", "<!-- bench:control-plane:end -->"


def fleet_doc(hosts: int, context: int = 8192) -> dict[str, Any]:
    """A fleet of ``hosts`` GPU hosts (4 × 24 GiB each), one gateway, ``hosts`` models of 2 replicas each."""

    def address(i: int) -> str:
        return f"10.80.{i // 250}.{i % 250 + 2}"

    def uuid(h: int, g: int) -> str:
        return f"GPU-{h:08x}-{g:04x}-4000-8000-{h * GPUS_PER_HOST + g:012x}"

    return {
        "version": 1,
        "name": f"scale-{hosts}",
        "mesh": {"kind": "wireguard", "subnet": "10.80.0.0/16", "listen_port": 51820},
        "hosts": [
            {
                "name": "gateway",
                "address": address(0),
                "ssh": "ops@gateway.example.org",
                "endpoint": "gateway.example.org:51820",
                "runtime": "compose",
            }
        ]
        + [
            {
                "name": f"gpu-{h:04d}",
                "address": address(h + 1),
                "ssh": f"ops@gpu-{h:04d}.example.org",
                "endpoint": f"gpu-{h:04d}.example.org:51820",
                "runtime": "compose",
                "gpus": [
                    {"uuid": uuid(h, g), "name": "NVIDIA GeForce RTX 3090", "vram_gib": 24}
                    for g in range(GPUS_PER_HOST)
                ],
            }
            for h in range(hosts)
        ],
        "secrets": {"hf_token_file": "/etc/fleet/secrets/hf_token"},
        "models": [
            {
                "name": f"model-{m:04d}",
                "backend": "vllm",
                "source": {"huggingface": f"example/model-{m:04d}"},
                "quantization": "fp8",
                "arch": {"layers": 32, "kv_heads": 8, "head_dim": 128, "params_b": 8.03},
                "context": context if m == 0 else 8192,
                "parallel": 4,
                "replicas": 2,
            }
            for m in range(hosts)
        ],
        "gateway": {
            "host": "gateway",
            "public_name": "llm.example.org",
            "tls": {"mode": "acme", "email": "admin@example.org"},
        },
        "auth": {"api_keys": True},
        "groups": [
            {"name": "staff", "models": ["*"], "rpm": 600},
            {"name": "interns", "models": [f"model-{m:04d}" for m in range(min(hosts, 5))], "daily_tokens": 500000},
        ],
        "users": [{"name": f"user-{u:03d}", "groups": ["staff" if u % 4 else "interns"]} for u in range(40)],
    }


def probe_of(b: Any) -> dict[str, Any]:
    """What a host that holds bundle ``b``, deployed and running, answers the deploy's probe with."""
    return {
        "files": dict(b.digests),
        "manifest": {"files": dict(b.digests), "services": dict(b.services)},
        "containers": [{"name": f"fleet-{name}", "state": "running"} for name in b.services],
        "wireguard": {"up": True},
    }


def measure(hosts: int) -> dict[str, Any]:
    """One fleet size, in this process: every stage's seconds, the diff's size and the peak RSS."""
    from controller.deploy import diff
    from controller.deploy.ansible import FORKS
    from controller.deploy.engine import FleetState, _bundles, _mesh_interface, rolling_waves
    from controller.plan import make_plan
    from controller.render import render_all
    from controller.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        folder = Path(tmp)
        before, after = folder / "before.yaml", folder / "fleet.yaml"
        before.write_text(yaml.safe_dump(fleet_doc(hosts, context=4096), sort_keys=False))
        after.write_text(yaml.safe_dump(fleet_doc(hosts), sort_keys=False))
        state = FleetState(folder / "state")
        # The previous deploy (keys made, bundles built): what the hosts hold now. Not timed.
        old_loaded = load_spec(before)
        old = _bundles(old_loaded, make_plan(old_loaded), state)
        probes = {h: probe_of(b) for h, b in old.items()}
        del old

        began = time.perf_counter()
        loaded = load_spec(after)
        validated = time.perf_counter()
        plan = make_plan(loaded)
        planned = time.perf_counter()
        files = render_all(plan)
        rendered = time.perf_counter()
        bundles = _bundles(loaded, plan, state)
        changes = {h: diff.changes(b, probes[h], _mesh_interface(plan)) for h, b in bundles.items()}
        checked = time.perf_counter()
        every = [(w.host, w.name) for w in plan.workers]
        waves = {
            "parallel_16": len(rolling_waves(plan, every, FORKS)),
            "unbounded": len(rolling_waves(plan, every, len(every))),
        }
    changed = {h: c for h, c in changes.items() if not c.empty}
    return {
        "hosts": hosts,
        "gpus": hosts * GPUS_PER_HOST,
        "replicas": len(plan.workers),
        "files": len(files),
        "validate_s": round(validated - began, 3),
        "plan_s": round(planned - validated, 3),
        "render_s": round(rendered - planned, 3),
        "deploy_check_s": round(checked - rendered, 3),
        "hosts_changed": len(changed),
        "services_restarted": sum(len(c.restart) for c in changed.values()),
        "rolling_waves": waves,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def envoy_at(hosts: int) -> dict[str, Any]:
    """Envoy with the rendered gateway configuration of a ``hosts``-host fleet: `envoy --mode validate` of it, then
    a real start (its listeners and admin on free loopback ports, each endpoint moved from the mesh's 10.80.x.y to the
    loopback address 127.80.x.y, so its health checks stay on this machine): seconds to `/ready`, resident memory, and the clusters and endpoints it holds."""
    import httpx

    from bench.procs import rss_mib
    from controller.plan import make_plan
    from controller.render import render_all
    from controller.spec import load_spec
    from tests.envoy_static import static_bootstrap
    from tests.stubs import free_ports, wait_ready

    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as tmp:
        folder = Path(tmp)
        spec = folder / "fleet.yaml"
        spec.write_text(yaml.safe_dump(fleet_doc(hosts), sort_keys=False))
        for rel, text in render_all(make_plan(load_spec(spec))).items():
            if "/envoy/" in rel:
                (folder / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / "out" / rel).write_text(text)
        (config,) = (folder / "out").glob("*/envoy/envoy.yaml")
        eds = folder / "eds"
        eds.mkdir()
        endpoints = 0
        for path in sorted((config.parent / "eds").glob("*.yaml")):
            doc = yaml.safe_load(path.read_text())
            for resource_ in doc["resources"]:
                for group in resource_.get("endpoints") or []:
                    for lb in group.get("lb_endpoints") or []:
                        where = lb["endpoint"]["address"]["socket_address"]
                        where["address"] = "127." + where["address"].split(".", 1)[1]  # 10.80.x.y: 127.80.x.y
                        endpoints += 1
            (eds / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        bootstrap = static_bootstrap(config, folder / "work", eds_dir=eds)
        listeners = bootstrap["static_resources"]["listeners"]
        admin, *ports = free_ports(1 + len(listeners))
        bootstrap["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin)
        for listener, port in zip(listeners, ports, strict=True):
            listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
        checked = folder / "envoy.yaml"
        checked.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        # Envoy opens an inotify instance for every file subscription: each cluster's endpoint file, the secrets.
        # Past the kernel's per-user limit it aborts at start (an assertion, "increase fs.inotify.max_user_instances").
        watched = checked.read_text().count("path_config_source:")  # at most this many
        with inotify_instances_for(watched) as (limit, raised_to):
            began = time.monotonic()
            valid = subprocess.run(
                [envoy, "--mode", "validate", "-c", str(checked), "--log-level", "warn"],
                capture_output=True,
                text=True,
                check=False,
            )
            validate_s = time.monotonic() - began
            if valid.returncode != 0:
                raise SystemExit(
                    f"envoy --mode validate refused the {hosts}-host configuration:\n{valid.stderr[-3000:]}"
                )
            began = time.monotonic()
            log = folder / "envoy.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [envoy, "-c", str(checked), "--log-level", "warn", "--base-id", str(admin)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                try:
                    wait_ready(f"http://127.0.0.1:{admin}/ready", proc, log, timeout=120)
                except RuntimeError as exc:  # it exited, or never got ready: what its log said, no traceback
                    raise SystemExit(f"envoy with the {hosts}-host configuration: {exc}") from None
                ready_s = time.monotonic() - began
                with httpx.Client(base_url=f"http://127.0.0.1:{admin}", timeout=5, trust_env=False) as http:
                    clusters = http.get("/clusters", params={"format": "json"}).json().get("cluster_statuses") or []
                inotify = sum(1 for fd in Path(f"/proc/{proc.pid}/fd").iterdir() if limits.is_inotify(fd))
                rss = rss_mib({"envoy": proc.pid})["envoy"]
            finally:
                proc.terminate()
                proc.wait(30)
    return {
        "hosts": hosts,
        "validate_s": round(validate_s, 2),
        "ready_s": round(ready_s, 2),
        "rss_mib": rss,
        "clusters": len(clusters),
        "endpoints": sum(len(c.get("host_statuses") or []) for c in clusters),
        "endpoints_rendered": endpoints,
        "listeners": len(listeners),
        "inotify_instances": inotify,  # what the running Envoy holds
        "inotify_limit": limit,
        "inotify_raised_to": raised_to,
    }


INOTIFY = limits.INOTIFY_LIMIT


@contextlib.contextmanager
def inotify_instances_for(watched: int) -> Iterator[tuple[int, int | None]]:
    """The per-user inotify limit raised (as root, for the block, then put back) where ``watched`` more instances
    and those this user's processes hold would pass it: (the limit found, what it was raised to or None)."""
    limit = int(INOTIFY.read_text())
    in_use = limits.inotify_in_use()
    need = watched + in_use + 16
    if need <= limit:
        yield limit, None
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"Envoy would watch {watched} files and fs.inotify.max_user_instances is {limit} ({in_use} in use): "
            f"run as root (the bench raises it for the run) or `sysctl -w fs.inotify.max_user_instances={need}`"
        )
    INOTIFY.write_text(str(need))
    try:
        yield limit, need
    finally:
        INOTIFY.write_text(str(limit))


def run(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "bench.control_plane", "--one", str(n)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"bench.control_plane: {n} hosts failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout))
        print(f"[bench] {n} hosts in {time.monotonic() - began:.1f} s: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step to the next size: how many times the hosts and the plan + render time grew."""
    out = []
    for a, b in itertools.pairwise(rows):
        ta, tb = a["plan_s"] + a["render_s"], b["plan_s"] + b["render_s"]
        out.append({"from": a["hosts"], "to": b["hosts"], "hosts_x": b["hosts"] / a["hosts"], "time_x": tb / ta})
    return out


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["hosts"]: r for r in rows}
    out = []
    for hosts, limit in ((200, 2.0), (1000, 10.0)):
        if hosts in by:
            t = by[hosts]["plan_s"] + by[hosts]["render_s"]
            out.append(
                f"{hosts} hosts: plan + render {t:.2f} s (target ≤ {limit:g} s: {'met' if t <= limit else 'MISSED'})"
            )
    if 200 in by and 1000 in by:
        x = (by[1000]["plan_s"] + by[1000]["render_s"]) / (by[200]["plan_s"] + by[200]["render_s"])
        out.append(f"growth from 200 to 1,000 hosts: {x:.1f}× (target ≤ 6×: {'met' if x <= 6 else 'MISSED'})")
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    rows = result["rows"]
    lines = [
        BEGIN,
        f"Machine: {machine()}. Command: `{command}`. Generated fleets of the homelab's shape (one gateway; N GPU "
        "hosts of 4 GPUs; N vLLM models of 2 replicas each); `deploy --check` is the bundles and the diff against "
        "the hosts' answers after a previous deploy with one model's context changed (no SSH); rolling waves: the "
        "waves a rolling update of every replica takes (`rolling_waves`, at `--parallel 16` and unbounded). "
        "Seconds; peak RSS of the process that ran every stage.",
        "",
        "| GPU hosts | GPUs | replicas | files | validate | plan | render | deploy --check | hosts changed "
        "| rolling waves (16 / unbounded) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hosts']} | {r['gpus']} | {r['replicas']} | {r['files']} | {r['validate_s']:.2f} "
            f"| {r['plan_s']:.2f} | {r['render_s']:.2f} | {r['deploy_check_s']:.2f} | {r['hosts_changed']} "
            f"| {r['rolling_waves']['parallel_16']} / {r['rolling_waves']['unbounded']} | {r['peak_rss_mib']:.0f} |"
        )
    steps = growth(rows)
    if steps:
        lines += [
            "",
            "Growth of plan + render per step: "
            + "; ".join(
                f"{s['from']} → {s['to']} hosts ({s['hosts_x']:g}× the hosts): {s['time_x']:.1f}× the time"
                for s in steps
            )
            + ".",
        ]
    envoy = result.get("envoy")
    if envoy:
        lines += [
            "",
            f"Envoy (`envoy --mode validate`, then started) with the {envoy['hosts']}-host gateway configuration: "
            f"valid, checked in {envoy['validate_s']:.2f} s; ready after {envoy['ready_s']:.2f} s holding "
            f"{envoy['clusters']} clusters, {envoy['endpoints']} endpoints and {envoy['listeners']} listeners; "
            f"{envoy['rss_mib']:.0f} MiB resident, {envoy['inotify_instances']} inotify instances (one per watched "
            "endpoint file, and the secrets)"
            + (
                f"; the kernel's fs.inotify.max_user_instances, {envoy['inotify_limit']} here, had to be raised for "
                f"it (to {envoy['inotify_raised_to']}, for the run): with the default Envoy aborts at start"
                if envoy["inotify_raised_to"]
                else ""
            )
            + ".",
        ]
    lines += ["", *verdicts(rows), END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.control_plane", description=__doc__)
    parser.add_argument("--hosts", default=",".join(map(str, SIZES)), help="comma-separated fleet sizes")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size in this process, JSON out
    parser.add_argument(
        "--envoy", type=int, default=200, help="start Envoy with this size's gateway configuration (0: do not)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the control-plane section of this Markdown file")
    args = parser.parse_args()
    if args.one is not None:
        from controller.errors import ControllerError

        try:
            print(json.dumps(measure(args.one)))
        except ControllerError as exc:  # the spec refuses this size (its bounds): say which, no traceback
            raise SystemExit("\n".join([f"{args.one} hosts: {exc.message}", *exc.lines()])) from None
        return
    try:
        sizes = [int(x) for x in args.hosts.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--hosts {args.hosts!r}: give comma-separated numbers of hosts, e.g. 10,50,200") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--hosts {args.hosts!r}: give at least one size, each 1 or more")
    rows = run(sizes)
    envoy = None
    if args.envoy:
        envoy = envoy_at(args.envoy)
        print(f"[bench] envoy with {args.envoy} hosts: {envoy}", file=sys.stderr, flush=True)
    publish(
        {"rows": rows, "growth": growth(rows), "verdicts": verdicts(rows), "envoy": envoy},
        markdown,
        prog="bench.control_plane",
        as_json=args.json,
        write=args.write,
        section=(BEGIN, END, "Control plane at fleet scale"),
    )


if __name__ == "__main__":
    main()
