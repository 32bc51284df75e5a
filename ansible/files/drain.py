#!/usr/bin/env python3
"""Wait, on the gateway host, until Envoy has taken one endpoint out of rotation and its requests have finished.

Run by Ansible's `script` module (ansible/drain.yml) after the endpoint was marked DRAINING in its EDS file;
standard library only. Argument: base64 JSON {"admin_port", "cluster", "address", "port", "timeout_s"}. Polls
Envoy's admin `/clusters?format=json` until the endpoint shows `eds_health_status: DRAINING` (Envoy read the
file) and no request is active on it, or the bound passes. Prints JSON: {"drained": bool, "seconds", "active",
"seen_draining"}; exit 0 either way (a drain that ran out of time is reported, and deploy goes on), 1 only when
Envoy cannot be asked.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.request


def endpoint(doc: dict, cluster: str, address: str, port: int) -> dict | None:
    for c in doc.get("cluster_statuses", []):
        if c.get("name") != cluster:
            continue
        for h in c.get("host_statuses", []):
            sa = h.get("address", {}).get("socket_address", {})
            if sa.get("address") == address and int(sa.get("port_value", 0)) == port:
                return h
    return None


def main() -> None:
    a = json.loads(base64.b64decode(sys.argv[1]))
    url = f"http://127.0.0.1:{a['admin_port']}/clusters?format=json"
    began = time.monotonic()
    active, seen = -1, False
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                doc = json.load(reply)
        except OSError as exc:
            print(f"Envoy's admin at {url} does not answer: {exc}", file=sys.stderr)
            sys.exit(1)
        host = endpoint(doc, a["cluster"], a["address"], a["port"])
        if host is None:
            seen, active = True, 0  # not in the cluster (any more): nothing can be sent to it
        else:
            seen = host.get("health_status", {}).get("eds_health_status") == "DRAINING"
            stats = {s.get("name"): int(s.get("value", 0)) for s in host.get("stats", [])}
            active = stats.get("rq_active", 0)
        took = time.monotonic() - began
        if seen and active == 0:
            print(json.dumps({"drained": True, "seconds": round(took, 2), "active": 0, "seen_draining": True}))
            return
        if took > a["timeout_s"]:
            print(json.dumps({"drained": False, "seconds": round(took, 2), "active": active, "seen_draining": seen}))
            return
        time.sleep(0.25)


if __name__ == "__main__":
    main()
