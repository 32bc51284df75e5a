#!/usr/bin/env python3
"""What a fleet host holds, as one JSON document on stdout: `controller deploy` reads it before changing anything.

Run by Ansible's `script` module (ansible/probe.yml) with the host's own Python 3, standard library only, and
changes nothing. Its one argument is base64 JSON: {"fleet", "paths", "manifest", "interface", "engine"}.
It reports: the sha256 of each path asked about (null: absent), the last deploy's manifest, the containers
labelled with the fleet's name, which tools are installed, the GPUs the CDI specs name, the GPUs nvidia-smi
sees (where present), the listening TCP ports, and the WireGuard interface's peers.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

MARKER = "FLEET-SCRIPT-JSON"  # controller/deploy/ansible.py SCRIPT_MARKER: the document follows it

CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
TOOLS = ("podman", "docker", "podman-compose", "systemctl", "wg", "wireguard-go", "wg-quick", "nvidia-smi", "ip")


def digest(path: str) -> str | None:
    """The file's sha256; "socket" for a Unix socket (a container engine's API); None when absent or a folder."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return "socket"
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def run(cmd: list[str], timeout: float = 20) -> tuple[int, str, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)


def containers(engine: str, fleet: str) -> tuple[list[dict[str, object]], str | None]:
    if not shutil.which(engine):
        return [], f"{engine} not installed"
    rc, out, err = run([engine, "ps", "-a", "--filter", f"label=io.fleet.fleet={fleet}", "--format", "json"])
    if rc != 0:
        return [], f"{engine} ps: {err.strip()[-300:]}"
    items = json.loads(out or "[]") if out.strip().startswith("[") else [json.loads(x) for x in out.splitlines()]
    found = []
    for item in items:
        names = item.get("Names") or [item.get("Name", "")]
        name = names[0] if isinstance(names, list) else str(names)
        labels = item.get("Labels") or {}
        found.append(
            {
                "name": name.lstrip("/"),
                "state": str(item.get("State", "")).lower(),
                "image": item.get("Image", ""),
                "labels": {k: v for k, v in labels.items() if k.startswith("io.fleet.")},
            }
        )
    return sorted(found, key=lambda c: str(c["name"])), None


def cdi_gpus() -> dict[str, str]:
    """GPU device names (kind nvidia.com/gpu) that the host's CDI specs declare -> the file declaring each."""
    found: dict[str, str] = {}
    for folder in CDI_DIRS:
        for path in sorted(glob.glob(os.path.join(folder, "*.yaml")) + glob.glob(os.path.join(folder, "*.json"))):
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError:
                continue
            if "nvidia.com/gpu" not in text:
                continue
            for name in re.findall(r"""(?m)^\s*-?\s*"?name"?\s*:\s*"?([A-Za-z0-9_.:-]+)"?""", text):
                if name.startswith("GPU-") or name.isdigit() or name == "all":
                    found.setdefault(name, path)
    return found


def smi_gpus() -> list[dict[str, object]] | None:
    if not shutil.which("nvidia-smi"):
        return None
    rc, out, _ = run(["nvidia-smi", "--query-gpu=uuid,memory.total", "--format=csv,noheader,nounits"])
    if rc != 0:
        return None
    gpus = []
    for line in out.splitlines():
        uuid, _, mib = line.partition(",")
        gpus.append({"uuid": uuid.strip(), "memory_mib": float(mib.strip() or 0)})
    return gpus


def listening() -> list[list[object]]:
    """[address, port] of every TCP socket in LISTEN state (from /proc/net/tcp and tcp6)."""
    out: set[tuple[str, int]] = set()
    for name, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(name, encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "0A":
                continue
            hex_addr, hex_port = parts[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if family == socket.AF_INET:
                addr = socket.inet_ntop(family, raw[::-1])
            else:
                addr = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            out.add((addr, int(hex_port, 16)))
    return [list(x) for x in sorted(out)]


def wireguard(interface: str | None) -> dict[str, object] | None:
    if not interface or not shutil.which("wg"):
        return None
    rc, out, err = run(["wg", "show", interface, "dump"])
    if rc != 0:
        return {"up": False, "error": err.strip()[-200:]}
    lines = out.splitlines()
    peers = {}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) >= 5:
            peers[f[0]] = {"endpoint": f[2], "latest_handshake": int(f[4] or 0)}
    public = lines[0].split("\t")[1] if lines else ""
    return {"up": True, "public_key": public, "peers": peers}


def main() -> None:
    args = json.loads(base64.b64decode(sys.argv[1]))
    manifest = None
    try:
        with open(args["manifest"], encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (FileNotFoundError, ValueError):
        manifest = None
    engine = args.get("engine") or ("podman" if shutil.which("podman") else "docker")
    found, engine_error = containers(engine, args["fleet"])
    doc = {
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "tools": {t: shutil.which(t) for t in TOOLS},
        "files": {p: digest(p) for p in args["paths"]},
        "manifest": manifest,
        "engine": engine,
        "engine_error": engine_error,
        "containers": found,
        "cdi_gpus": cdi_gpus(),
        "smi_gpus": smi_gpus(),
        "listening": listening(),
        "wireguard": wireguard(args.get("interface")),
    }
    compose = args.get("compose")
    if compose:
        doc["tools"]["compose"] = shutil.which(compose.split()[0])
    # One flushed write after a marker line: the controller reads what follows the last marker, so a stray line
    # (a warning, stderr merged into stdout by a terminal) cannot corrupt the document.
    sys.stdout.write("\n" + MARKER + " " + json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
