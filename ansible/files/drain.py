#!/usr/bin/env python3
"""Wait, on the gateway host, until Envoy has taken endpoints out of rotation and their requests have finished.

Run by Ansible's `script` module (ansible/drain.yml) after each endpoint was marked DRAINING in its cluster's EDS
file; standard library only. Argument: base64 JSON {"admin_port", "timeout_s", "endpoints": [{"cluster",
"address", "port"}, ...]} (one rolling wave: at most one endpoint per cluster). Polls Envoy's admin
`/clusters?format=json` until every endpoint shows `eds_health_status: DRAINING` (Envoy read its file) and no
request is active on it, or the bound passes. Prints JSON: {"drained": bool (all of them), "seconds",
"endpoints": [{"cluster", "address", "port", "drained", "seconds", "active", "seen_draining"}, ...]} with each
endpoint's own time to drain; exit 0 either way (a drain that ran out of time is reported, and deploy goes on), 1
only when Envoy cannot be asked.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.request

MARKER = "FLEET-SCRIPT-JSON"  # controller/deploy/ansible.py SCRIPT_MARKER: the document follows it


def endpoint(doc: dict, cluster: str, address: str, port: int) -> dict | None:
    for c in doc.get("cluster_statuses", []):
        if c.get("name") != cluster:
            continue
        for h in c.get("host_statuses", []):
            sa = h.get("address", {}).get("socket_address", {})
            if sa.get("address") == address and int(sa.get("port_value", 0)) == port:
                return h
    return None


def state(doc: dict, e: dict) -> tuple[bool, int]:
    """(Envoy shows it DRAINING, requests active on it); an endpoint no longer in its cluster gets nothing."""
    host = endpoint(doc, e["cluster"], e["address"], e["port"])
    if host is None:
        return True, 0
    seen = host.get("health_status", {}).get("eds_health_status") == "DRAINING"
    stats = {s.get("name"): int(s.get("value", 0)) for s in host.get("stats", [])}
    return seen, stats.get("rq_active", 0)


def main() -> None:
    a = json.loads(base64.b64decode(sys.argv[1]))
    url = f"http://127.0.0.1:{a['admin_port']}/clusters?format=json"
    began = time.monotonic()
    report = [{**e, "drained": False, "seconds": None, "active": -1, "seen_draining": False} for e in a["endpoints"]]
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                doc = json.load(reply)
        except OSError as exc:
            print(f"Envoy's admin at {url} does not answer: {exc}", file=sys.stderr)
            sys.exit(1)
        took = round(time.monotonic() - began, 2)
        for r in report:
            if r["drained"]:
                continue
            r["seen_draining"], r["active"] = state(doc, r)
            if r["seen_draining"] and r["active"] == 0:
                r["drained"], r["seconds"] = True, took
        done = all(r["drained"] for r in report)
        if done or took > a["timeout_s"]:
            # One flushed write after a marker (see probe.py): the controller reads what follows the last marker.
            doc = {"drained": done, "seconds": took, "endpoints": report}
            sys.stdout.write("\n" + MARKER + " " + json.dumps(doc) + "\n")
            sys.stdout.flush()
            return
        time.sleep(0.25)


if __name__ == "__main__":
    main()
