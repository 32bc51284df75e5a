#!/usr/bin/env python3
"""A deployed fleet host's state, as one JSON document on stdout: `controller status SPEC` reads it.

Run by Ansible's `script` module (ansible/status.yml) with the host's own Python 3, standard library only, and
changes nothing. Its one argument is base64 JSON: {"fleet", "manifest", "engine", "interface", "agent", "peers",
"timeout_s"}; ``agent`` is this host's agent status URL (null: no agent here), ``peers`` a list of
{"name", "address", "port"} (``port`` null: nothing to connect to on that peer).

It reports: the last deploy's manifest, the containers labelled with the fleet's name and their state, the
agent's status JSON (fetched from this host), per peer a TCP connect from this host to the peer's mesh address
(after a UDP datagram that makes WireGuard start a handshake where its session is old), then the WireGuard
interface: whether it is up, and per peer its latest handshake and endpoint. Every check is bounded by
``timeout_s``; the checks run in parallel.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

MARKER = "FLEET-SCRIPT-JSON"  # controller/deploy/ansible.py SCRIPT_MARKER: the document follows it

IFF_UP = 0x1
DISCARD_PORT = 9  # the nudge's destination: nothing needs to listen there, WireGuard only needs a packet to send
HANDSHAKE_WAIT_S = 2.0  # how long to wait for a handshake the nudge started, for peers without a TCP check


def run(cmd: list[str], timeout: float = 20) -> tuple[int, str, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)


def manifest(path: str) -> tuple[dict[str, object] | None, str | None]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path}: {exc}"


def containers(engine: str, fleet: str) -> tuple[list[dict[str, object]], str | None]:
    if not shutil.which(engine):
        return [], f"{engine} not installed"
    rc, out, err = run([engine, "ps", "-a", "--filter", f"label=io.fleet.fleet={fleet}", "--format", "json"])
    if rc != 0:
        return [], f"{engine} ps: {err.strip()[-300:]}"
    try:
        items = json.loads(out or "[]") if out.strip().startswith("[") else [json.loads(x) for x in out.splitlines()]
    except ValueError:
        return [], f"{engine} ps printed no JSON: {out[-200:]!r}"
    found = []
    for item in items:
        names = item.get("Names") or [item.get("Name", "")]
        name = names[0] if isinstance(names, list) else str(names)
        found.append(
            {
                "name": name.lstrip("/"),
                "state": str(item.get("State", "")).lower(),
                "status": str(item.get("Status", "")),
                "image": item.get("Image", ""),
            }
        )
    return sorted(found, key=lambda c: str(c["name"])), None


def agent(url: str, timeout: float) -> dict[str, object]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # mesh addresses: never through a proxy
    began = time.monotonic()
    try:
        with opener.open(url, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
        return {"url": url, "ok": True, "seconds": round(time.monotonic() - began, 4), "status": body}
    except urllib.error.HTTPError as exc:
        error = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"url": url, "ok": False, "seconds": round(time.monotonic() - began, 4), "error": error}


def nudge(address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"fleet status", (address, DISCARD_PORT))
    except OSError:
        pass  # no route: the TCP check or the handshake says so


def connect(address: str, port: int, timeout: float) -> dict[str, object]:
    began = time.monotonic()
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        return {"address": address, "port": port, "ok": True, "seconds": round(time.monotonic() - began, 4)}
    except OSError as exc:
        error = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        return {
            "address": address,
            "port": port,
            "ok": False,
            "seconds": round(time.monotonic() - began, 4),
            "error": error,
        }


def link_up(interface: str) -> bool | None:
    try:
        with open(f"/sys/class/net/{interface}/flags", encoding="ascii") as handle:
            return bool(int(handle.read().strip(), 16) & IFF_UP)
    except (OSError, ValueError):
        return None


def wireguard(interface: str | None) -> dict[str, object] | None:
    if not interface:
        return None
    up = link_up(interface)
    if up is None:
        return {"exists": False, "up": False, "error": f"no interface {interface}"}
    if not shutil.which("wg"):
        return {"exists": True, "up": up, "error": "wg not installed (apt-get install wireguard-tools)"}
    rc, out, err = run(["wg", "show", interface, "dump"])
    if rc != 0:
        return {"exists": True, "up": up, "error": f"wg show {interface}: {err.strip()[-200:]}"}
    lines = out.splitlines()
    peers = {}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) >= 5:
            peers[f[0]] = {"endpoint": None if f[2] == "(none)" else f[2], "latest_handshake": int(f[4] or 0)}
    public = lines[0].split("\t")[1] if lines and len(lines[0].split("\t")) > 1 else ""
    return {"exists": True, "up": up, "public_key": public, "peers": peers}


def main() -> None:
    args = json.loads(base64.b64decode(sys.argv[1]))
    timeout = float(args.get("timeout_s") or 3)
    began = time.time()
    peers = args.get("peers") or []
    for peer in peers:
        nudge(peer["address"])
    results: dict[str, dict[str, object]] = {}
    threads = []

    def check(name: str, address: str, port: int) -> None:
        results[name] = connect(address, port, timeout)

    for peer in peers:
        if peer.get("port"):
            threads.append(threading.Thread(target=check, args=(peer["name"], peer["address"], int(peer["port"]))))
    agent_result: list[dict[str, object]] = []
    if args.get("agent"):
        threads.append(threading.Thread(target=lambda: agent_result.append(agent(args["agent"], timeout + 2))))
    for t in threads:
        t.start()
    found, manifest_error = manifest(args["manifest"])
    engine = args.get("engine") or ("podman" if shutil.which("podman") else "docker")
    listed, engine_error = containers(engine, args["fleet"])
    for t in threads:
        t.join()
    mesh = wireguard(args.get("interface"))
    untested = [p for p in peers if not p.get("port")]
    if mesh and mesh.get("peers") is not None and untested:
        deadline = time.monotonic() + HANDSHAKE_WAIT_S
        while time.monotonic() < deadline:
            handshakes = [peer["latest_handshake"] for peer in mesh["peers"].values()]
            if min(handshakes, default=began) >= began - 120:  # every session fresh (WireGuard rekeys at 120 s)
                break
            time.sleep(0.25)
            mesh = wireguard(args.get("interface"))
    doc = {
        "hostname": socket.gethostname(),
        "now": time.time(),
        "manifest": found,
        "manifest_error": manifest_error,
        "engine": engine,
        "engine_error": engine_error,
        "containers": listed,
        "agent": agent_result[0] if agent_result else None,
        "tcp": results,
        "wireguard": mesh,
    }
    # One flushed write after a marker (see probe.py): the controller reads what follows the last marker.
    sys.stdout.write("\n" + MARKER + " " + json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
