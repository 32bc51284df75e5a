"""The rendered WireGuard mesh, brought up for real with wireguard-go in three network namespaces.

Three hosts, each in its own network namespace, joined by veth pairs to a bridge in a fourth namespace
(the underlay, 10.201.X.0/24 with a random X). Each host runs wireguard-go in a private mount namespace
with a per-host folder bound over /run/wireguard, so every host uses the spec's own interface name
(fleet0) without the control sockets clashing; later commands enter that host's mount and network
namespaces with nsenter. The configs are the ones `mesh_configs` renders, loaded as wg-quick does
(`wg syncconf` of `syncconf_text`, then the private key with `wg set`, as the config's PostUp does);
a live update goes through `host_sync_command`, which keeps the interface's key and sessions.

Needs root, /dev/net/tun, ip, nsenter, unshare, wg and wireguard-go.
"""

from __future__ import annotations

import copy
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controller.mesh import ensure_keys, host_sync_command, mesh_configs, private_key_file, syncconf_text
from controller.spec.models import Fleet
from tests.conftest import need_tool
from tests.helpers import MINIMAL

pytestmark = pytest.mark.contract

IFACE = "fleet0"
ECHO_PORT = 7777
NAMES = ("a", "b", "c")
MESH = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3", "d": "10.77.0.4"}

ECHO_SERVER = """
import socket, socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""

# Connect (retrying while the first handshake happens), then echo one line.
ECHO_ONCE = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
            s.sendall(b"ping\\n")
            data = s.makefile("rb").readline()
        if data != b"ping\\n":
            sys.exit(f"echo was {data!r}")
        print("ok")
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"no answer: {exc}")
        time.sleep(0.2)
"""

# One connection, a numbered line every 50 ms until the file argv[3] exists; prints the count and the longest wait.
ECHO_STREAM = """
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.settimeout(3)
reader = s.makefile("rb")
n, worst = 0, 0.0
while not os.path.exists(sys.argv[3]):
    start = time.monotonic()
    s.sendall(b"%d\\n" % n)
    if reader.readline() != b"%d\\n" % n:
        sys.exit(f"line {n} not echoed")
    worst = max(worst, time.monotonic() - start)
    n += 1
    if n == 1:
        print("started", flush=True)
    time.sleep(0.05)
print(f"{n} {worst:.3f}", flush=True)
"""


def run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass
class Node:
    name: str
    netns: str
    underlay: str
    rundir: Path
    wg: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def enter(self, *cmd: str) -> list[str]:
        """``cmd`` inside this host's network and mount namespaces (the mount one sees its /run/wireguard)."""
        assert self.wg is not None, f"{self.name}: wireguard-go is not running"
        return ["nsenter", "--target", str(self.wg.pid), "--mount", "--net", *cmd]

    def sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.enter(*cmd), check=check)


@dataclass
class Lab:
    tag: str
    bridge_ns: str
    subnet: str  # the underlay's first three octets
    nodes: dict[str, Node] = field(default_factory=dict)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    for tool, hint in (
        ("ip", "apt-get install iproute2"),
        ("nsenter", "apt-get install util-linux"),
        ("unshare", "apt-get install util-linux"),
        ("wg", "apt-get install wireguard-tools"),
        ("wireguard-go", "apt-get install wireguard-go"),
    ):
        need_tool(tool, hint)
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not Path("/dev/net/tun").exists():
        pytest.skip("/dev/net/tun is missing: wireguard-go cannot make its interface")
    tag = secrets.token_hex(3)
    lab = Lab(tag=tag, bridge_ns=f"fm-{tag}-br", subnet=f"10.201.{random.randrange(256)}")
    made_ns: list[str] = []
    try:
        run("ip", "netns", "add", lab.bridge_ns)
        made_ns.append(lab.bridge_ns)
        br = ["ip", "-n", lab.bridge_ns]
        run(*br, "link", "add", "br0", "type", "bridge")
        run(*br, "link", "set", "br0", "up")
        for i, name in enumerate(NAMES, start=1):
            ns = f"fm-{tag}-{name}"
            run("ip", "netns", "add", ns)
            made_ns.append(ns)
            near, far = f"fm{tag}{name}0", f"fm{tag}{name}1"  # 10 characters: under IFNAMSIZ
            run("ip", "link", "add", near, "type", "veth", "peer", "name", far)
            run("ip", "link", "set", near, "netns", ns)
            run("ip", "link", "set", far, "netns", lab.bridge_ns)
            run(*br, "link", "set", far, "master", "br0")
            run(*br, "link", "set", far, "up")
            run("ip", "-n", ns, "link", "set", near, "name", "eth0")
            underlay = f"{lab.subnet}.{i}"
            run("ip", "-n", ns, "addr", "add", f"{underlay}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            rundir = tmp_path / f"run-{name}"
            rundir.mkdir(mode=0o700)
            lab.nodes[name] = Node(name=name, netns=ns, underlay=underlay, rundir=rundir)
        yield lab
    finally:
        for proc in reversed(lab.procs):
            _stop(proc)
        for ns in made_ns:  # deleting a namespace deletes its veth ends and the bridge
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)
        for name in NAMES:  # a veth end that never left the root namespace
            subprocess.run(["ip", "link", "del", f"fm{tag}{name}0"], capture_output=True, check=False, timeout=30)
        left = run("ip", "netns", "list").stdout
        assert f"fm-{tag}-" not in left, f"namespaces left behind: {left}"


def fleet_for(lab: Lab, hosts: tuple[str, ...] = NAMES) -> Fleet:
    data = copy.deepcopy(MINIMAL)
    gpus = data["hosts"][0]["gpus"]
    data["name"] = f"fm{lab.tag}"
    data["mesh"] = {"kind": "wireguard", "subnet": "10.77.0.0/24", "interface": IFACE}
    data["hosts"] = [
        {"name": h, "address": MESH[h], "endpoint": f"{lab.subnet}.{i}", **({"gpus": gpus} if h == "a" else {})}
        for i, h in enumerate(hosts, start=1)
    ]
    data["gateway"]["host"] = "a"
    return Fleet.model_validate(data)


def start_wireguard(lab: Lab, node: Node) -> None:
    """wireguard-go in ``node``'s network namespace and a private mount namespace, its socket in node.rundir."""
    node.log = node.rundir.parent / f"wireguard-go-{node.name}.log"
    script = 'mkdir -p /run/wireguard && mount --bind "$1" /run/wireguard && exec wireguard-go -f "$2"'
    with node.log.open("wb") as log:
        node.wg = lab.spawn(
            [
                *("ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation", "private"),
                *("sh", "-c", script, "sh", str(node.rundir), IFACE),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    socket = node.rundir / f"{IFACE}.sock"
    deadline = time.monotonic() + 15
    while not socket.exists():
        if node.wg.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: wireguard-go did not start: {node.log.read_text(errors='replace')}")
        time.sleep(0.1)


def apply(node: Node, conf: str, workdir: Path) -> None:
    path = workdir / f"{node.name}-sync-{time.monotonic_ns()}.conf"
    path.write_text(syncconf_text(conf), encoding="utf-8")
    node.sh("wg", "syncconf", IFACE, str(path))


def wg_show(node: Node, what: str) -> dict[str, list[str]]:
    """`wg show IFACE <what>` as {peer public key: the other columns}."""
    out = node.sh("wg", "show", IFACE, what).stdout
    return {cols[0]: cols[1:] for cols in (line.split("\t") for line in out.splitlines() if line.strip())}


def echo_once(src: Node, dst: str) -> subprocess.CompletedProcess[str]:
    return run(*src.enter(sys.executable, "-c", ECHO_ONCE, dst, str(ECHO_PORT), "15"), check=False)


@pytest.mark.timeout(120)
def test_three_hosts_mesh_and_syncconf_keeps_live_peers(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"
    fleet = fleet_for(lab)
    keys = ensure_keys(state, fleet)
    configs = mesh_configs(fleet, keys)
    assert sorted(configs) == [f"{h}/wireguard/{IFACE}.conf" for h in NAMES]

    for name, node in lab.nodes.items():
        start_wireguard(lab, node)
        # wg-quick's order: the stripped config, then PostUp's `wg set private-key` (syncconf would clear a key).
        apply(node, configs[f"{name}/wireguard/{IFACE}.conf"], tmp_path)
        node.sh("wg", "set", IFACE, "private-key", str(private_key_file(state, fleet.name, name)))
        node.sh("ip", "addr", "add", f"{MESH[name]}/24", "dev", IFACE)
        node.sh("ip", "link", "set", IFACE, "up")
        assert node.sh("wg", "show", IFACE, "public-key").stdout.strip() == keys[name]
        lab.spawn(node.enter(sys.executable, "-c", ECHO_SERVER, MESH[name], str(ECHO_PORT)))
    # The configs are what the interfaces now hold: each peer's key, allowed IPs and endpoint.
    for name, node in lab.nodes.items():
        allowed = wg_show(node, "allowed-ips")
        endpoints = wg_show(node, "endpoints")
        others = [h for h in NAMES if h != name]
        assert sorted(allowed) == sorted(keys[h] for h in others)
        for h in others:
            assert allowed[keys[h]] == [f"{MESH[h]}/32"]
            assert endpoints[keys[h]] == [f"{lab.nodes[h].underlay}:51820"]

    time.sleep(0.5)  # the echo servers bind
    for src in NAMES:
        for dst in NAMES:
            if src != dst:
                result = echo_once(lab.nodes[src], MESH[dst])
                assert result.returncode == 0 and result.stdout.strip() == "ok", (
                    f"{src} -> {dst} ({MESH[dst]}) over the mesh: {result.stdout} {result.stderr}"
                )

    # A live stream from a to b while a takes a new config (a fourth host, d, joins the mesh).
    a = lab.nodes["a"]
    stop = tmp_path / "stop-stream"
    stream = lab.spawn(
        a.enter(sys.executable, "-c", ECHO_STREAM, MESH["b"], str(ECHO_PORT), str(stop)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert stream.stdout is not None
    assert stream.stdout.readline().strip() == "started", "the stream a -> b did not start"
    time.sleep(1.5)  # so a re-made handshake would show a later second than the first
    handshake_before = wg_show(a, "latest-handshakes")[keys["b"]]
    transfer_before = [int(x) for x in wg_show(a, "transfer")[keys["b"]]]
    assert int(handshake_before[0]) > 0, "a has no handshake with b"

    bigger = fleet_for(lab, (*NAMES, "d"))
    new_keys = ensure_keys(state, bigger)
    assert {h: new_keys[h] for h in NAMES} == keys, "existing hosts kept their keys"
    new_conf = mesh_configs(bigger, new_keys)[f"a/wireguard/{IFACE}.conf"]
    assert new_conf != configs[f"a/wireguard/{IFACE}.conf"]
    stripped = tmp_path / "a-update.conf"
    stripped.write_text(syncconf_text(new_conf), encoding="utf-8")
    a.sh("sh", "-c", host_sync_command(IFACE, str(stripped), str(private_key_file(state, fleet.name, "a"))))
    time.sleep(1.5)  # traffic goes on over the existing session

    assert a.sh("wg", "show", IFACE, "public-key").stdout.strip() == keys["a"], "a lost its key"
    peers = wg_show(a, "allowed-ips")
    assert peers.get(new_keys["d"]) == [f"{MESH['d']}/32"], "d was not added"
    assert wg_show(a, "latest-handshakes")[keys["b"]] == handshake_before, "a's session with b was reset"
    transfer_after = [int(x) for x in wg_show(a, "transfer")[keys["b"]]]
    assert all(after > before for after, before in zip(transfer_after, transfer_before, strict=True)), (
        f"a's counters for b went from {transfer_before} to {transfer_after}: the peer was re-made or traffic stopped"
    )
    stop.touch()
    out, err = stream.communicate(timeout=15)
    assert stream.returncode == 0, f"the stream a -> b broke: {out} {err}"
    count, worst = out.split()
    assert int(count) >= 20 and float(worst) < 1.0, f"stream a -> b: {count} lines, longest wait {worst}s"
    # And a still reaches c after the change.
    result = echo_once(a, MESH["c"])
    assert result.returncode == 0, f"a -> c after the new config: {result.stdout} {result.stderr}"
