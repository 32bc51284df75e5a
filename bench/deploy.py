"""Benchmark: `controller deploy` onto three fresh fake hosts, and what clients see of deploys and faults.

The hosts are the multihost test tier's (tests/multihost/hosts.py: network namespaces with their own sshd and
podman store, a WireGuard mesh between them; gateway, gpu1 with 2 fake GPUs, gpu2 with 1), the fleet its spec
(tests/multihost/fleet.py: tiny-chat on gpu1 and gpu2, tiny-embed on gpu1), deployed from this machine over SSH
with Ansible as an operator would. Measured, one after the other on the same hosts:

- **first deploy**: wall time of `controller deploy --yes` onto the bare hosts (images shipped with ``--image``;
  the third-party stand-ins are preloaded, as a real host would pull them; building them is not counted);
- **no-op redeploy**: the same deploy again, the fleet unchanged, ``--noop-runs`` times (median, min, max; every
  host must report "no change");
- **link cut** (tests/multihost/faults.py `measure_link_cut`): gpu1's link blackholed under a steady tiny-chat
  load of 4 clients: seconds until gpu1's endpoints leave rotation (Envoy's admin), client errors in that window
  and during the whole cut, tiny-embed's 503 latency, seconds until back after the link returns;
- **rolling replacement**: both tiny-chat replicas replaced (a changed option) while 50 streams are live and 2
  clients send short requests: requests and streams that failed.

Needs root and the multihost tier's programs (ip, nsenter, unshare, sshd, ssh, podman, runc, busybox). About 5-10
minutes on two cores. Run as root from the repository root:

    .venv/bin/python -m bench.deploy [--noop-runs 3] [--json] [--write docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench.report import machine, publish

BEGIN, END = "<!-- bench:deploy:begin -->", "<!-- bench:deploy:end -->"
HOSTS = ("gateway", "gpu1", "gpu2")
STREAMS = 50


def log(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


@contextmanager
def fresh_fleet(tmp: Path) -> Iterator[Any]:
    """The multihost tier's three hosts and its fleet's images (as tests/multihost/conftest.py makes them)."""
    from controller.spec.models import Images
    from tests.images import build_fleet_images, build_stand_ins, podman_store
    from tests.multihost.fleet import Fleet, podman, write_fleet
    from tests.multihost.hosts import Hosts, HostSpec

    # tests/multihost/conftest.py's FLEET
    with Hosts(tmp / "mh", [HostSpec("gateway"), HostSpec("gpu1", gpus=2), HostSpec("gpu2", gpus=1)]) as hosts:
        folder = tmp / "fleet"
        spec = write_fleet(folder, hosts)
        store_dir = Path(tempfile.mkdtemp(prefix="fmh-", dir="/tmp"))  # podman's runroot: at most 50 characters
        store = podman_store(store_dir)
        try:
            images = Images()
            began = time.monotonic()
            own = build_fleet_images(store[0], store[1], images)
            third = build_stand_ins(store[0], store[1], images)
            archives = {}
            for tag in own:
                archives[tag] = folder / f"{tag.rsplit('/', 1)[-1].replace(':', '-')}.tar"
                podman(store, "save", "-o", str(archives[tag]), tag)
            bundle = folder / "third-party.tar"
            podman(store, "save", "-m", "-o", str(bundle), *sorted(third))
            for host in hosts:
                host.run(f"podman load -i {bundle}", timeout=300)
            log(f"hosts up in {hosts.setup_seconds:.1f} s, images built and loaded in {time.monotonic() - began:.0f} s")
            yield Fleet(hosts, folder, spec, folder / "state", archives, store)
        finally:
            podman(store, "system", "reset", "--force")
            shutil.rmtree(store_dir, ignore_errors=True)


def _results(deploy: Any) -> dict[str, str]:
    return {h: deploy.out.get("hosts", {}).get(h, {}).get("result", "?") for h in HOSTS}


def rolling(fleet: Any) -> dict[str, Any]:
    """Both tiny-chat replicas replaced (threads 1 → 2) under 50 live streams and a steady load of 2 clients."""
    from tests.multihost.faults import Load, api_key, gateway_ca, sdk

    spec = yaml.safe_load(fleet.spec.read_text())
    (chat,) = [m for m in spec["models"] if m["name"] == "tiny-chat"]
    chat["options"]["threads"] = 2
    changed = fleet.folder / "fleet-threads.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    ca = gateway_ca(fleet)
    key = api_key(fleet, "alice")
    client = sdk(fleet, key, ca, timeout=300)
    errors: list[str] = []
    finished: list[str] = []
    started = threading.Barrier(STREAMS + 1, timeout=120)

    def stream() -> None:
        try:
            chunks = client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "go"}],
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            reason = None
            for i, chunk in enumerate(chunks):
                if i == 0:
                    started.wait()
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
            finished.append(str(reason))
        except Exception as exc:  # counted
            errors.append(f"stream: {exc!r}")

    threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    load = Load(lambda: sdk(fleet, key, ca), 2).start()
    try:
        started.wait()
        result = fleet.deploy("--yes", spec=changed)
    finally:
        load.stop()
        for t in threads:
            t.join(300)
        client.close()
    unfinished = [r for r in finished if r != "length"]
    return {
        "seconds": round(result.seconds, 1),
        "rc": result.rc,
        "results": _results(result),
        "streams": STREAMS,
        "streams_failed": sum(1 for e in errors if e.startswith("stream")) + len(unfinished),
        "requests": len(load.answers),
        "requests_failed": len(load.errors()),
        "errors": (errors + load.errors())[:5],
    }


def run(noop_runs: int) -> dict[str, Any]:
    from tests.multihost.faults import measure_link_cut

    out: dict[str, Any] = {"machine": machine(), "date": datetime.date.today().isoformat()}
    with open("/proc/loadavg") as f:
        out["load_before"] = f.read().split()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        with fresh_fleet(tmp) as fleet:
            first = fleet.deploy("--yes")
            if first.rc != 0:
                raise RuntimeError(f"the first deploy failed ({first.rc}): {first.stderr[-3000:]}")
            out["first_deploy_s"] = round(first.seconds, 1)
            log(f"first deploy: {first.seconds:.1f} s")
            noops = []
            for _ in range(noop_runs):
                again = fleet.deploy("--yes")
                if again.rc != 0 or set(_results(again).values()) != {"no change"}:
                    raise RuntimeError(f"a no-op deploy changed something: {_results(again)} {again.stderr[-2000:]}")
                noops.append(round(again.seconds, 2))
                log(f"no-op deploy: {again.seconds:.1f} s")
            out["noop_deploy_s"] = {
                "median": round(statistics.median(noops), 1),
                "min": min(noops),
                "max": max(noops),
                "runs": noops,
            }
            cut = measure_link_cut(fleet, "gpu1", clients=4, hold_s=20, log=log)
            out["link_cut"] = cut.summary()
            out["link_cut"]["health_window"] = cut.window.describe()
            out["rolling"] = rolling(fleet)
            log(f"rolling: {out['rolling']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def markdown(r: dict[str, Any], command: str) -> str:
    c, roll, noop = r["link_cut"], r["rolling"], r["noop_deploy_s"]
    embed = ", ".join(f"{s} in {t:.2f} s" for s, t in c["embed_503"])
    lines = [
        BEGIN,
        f"Run {r['date']} on {r['machine']} (load average {r['load_before']} at the start). "
        f"Command: `{command}`. Three fake hosts (network namespaces with their own sshd and podman store, a "
        "WireGuard mesh over wireguard-go) on this one machine, deployed over SSH with Ansible; the tiny model.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| first deploy, 3 hosts | {r['first_deploy_s']:.1f} s | |",
        f"| no-op redeploy, 3 hosts (median of {len(noop['runs'])}) | {noop['median']:.1f} s "
        f"(min {noop['min']:.1f}, max {noop['max']:.1f}) | ≤ 5 s |",
        f"| rolling replacement of both tiny-chat replicas, {roll['streams']} live streams + {roll['requests']} "
        f"short requests | {roll['streams_failed']} streams and {roll['requests_failed']} requests failed, "
        f"{roll['seconds']:.1f} s | 0 failed |",
        f"| gpu1 link cut: its tiny-chat replica out of rotation | {c['chat_out_of_rotation_s']:.1f} s "
        f"(active health check: {c['chat_failed_health_check_s']:.1f} s) | ≤ {c['health_window_s']:g} s "
        "(health-check window) |",
        f"| gpu1 link cut: tiny-embed (only on gpu1) out of rotation | {c['embed_out_of_rotation_s']:.1f} s | "
        f"≤ {c['health_window_s']:g} s |",
        f"| client errors between the cut and out of rotation / during the whole cut ({c['cut_s']:.0f} s, "
        f"{c['requests_during_cut']} requests, 4 clients) | {c['errors_in_window']} / {c['error_count']} "
        f"(p50 {c['latency_s'].get('p50', 0):.2f} s, slowest {c['latency_s'].get('max', 0):.1f} s) | 0 |",
        f"| tiny-embed while cut | {embed} | 503, fast |",
        f"| back in rotation after the link returns (tiny-chat / tiny-embed) | {c['back_chat_s']:.1f} s / "
        f"{c['back_embed_s']:.1f} s, no deploy | |",
        "",
        f"Health-check window: {c['health_window']}.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.deploy", description=__doc__)
    parser.add_argument("--noop-runs", type=int, default=3, help="how many no-op redeploys (median reported)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the deploy section of this Markdown file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.deploy needs root (network and mount namespaces, a bridge), as the multihost tests do")
    publish(
        run(args.noop_runs),
        markdown,
        prog="bench.deploy",
        as_json=args.json,
        write=args.write,
        section=(BEGIN, END, "Deploy"),
    )


if __name__ == "__main__":
    main()
