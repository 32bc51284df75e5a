"""The WireGuard mesh: one key pair per host, and one wg-quick config per host.

Keys live in the state folder, generated once and reused forever (``rotate``
replaces one host's pair on request):

    <state_dir>/mesh/<fleet>/            mode 0700
        <host>.key                       the private key, as `wg genkey` prints it (mode 0600)
        <host>.pub                       its public key, as `wg pubkey` prints it

Rendered configs carry public keys only. Each host's private key is copied by
deploy to ``PRIVATE_KEY_PATH`` and loaded by the config's ``PostUp`` line, so
the rendered tree can be read, diffed and shared without leaking a secret.

The peer rules (full mesh, hosts by name):

- every other host is a ``[Peer]`` with ``AllowedIPs = <its mesh address>/32``;
- ``Endpoint`` is the peer's ``endpoint``, with ``listen_port`` added when it
  names no port; a peer without an endpoint has no ``Endpoint`` line (it is
  behind NAT and dials in; WireGuard learns its address from its packets);
- ``PersistentKeepalive = 25`` on every peer that has an ``Endpoint`` when
  *this* host has no endpoint: it is behind NAT, so it dials out and keeps
  the NAT mapping open, or the peers could not reach it back after the mapping
  expires. Hosts with an endpoint send no keepalives (nothing to keep open).

Two hosts that both lack an endpoint cannot reach each other (neither knows
where to send the first packet). That is an error when one of them is the
gateway (the gateway must reach every host's workers and agent), and a host
with no endpoint whose peers all lack one too is unreachable (an error);
other such pairs are listed by ``unreachable_pairs`` for the CLI to warn about.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import stat
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from controller.atomic import write_file
from controller.errors import DeployError, Problem, SpecError
from controller.local.state import StateDir
from controller.plan import Plan
from controller.spec.models import Fleet, Host
from controller.spec.yamlload import dotted

PRIVATE_KEY_PATH = "/etc/fleet/secrets/wireguard.key"  # where deploy puts each host's private key
KEEPALIVE_S = 25
HEADER = "# Rendered by controller mesh; do not edit.\n"
KEY_MODE = 0o600
DIR_MODE = 0o700
# [Interface] keys that wg-quick consumes itself; `wg-quick strip` drops them, `wg syncconf` rejects them.
WG_QUICK_ONLY = frozenset({"address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown", "saveconfig"})

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]


class MeshKeyError(DeployError):
    """The key folder or a key file is unusable (wrong mode, unparsable); names the file and what to do."""


# -- keys -----------------------------------------------------------------------------


def generate_private_key() -> str:
    """A new private key, base64 as `wg genkey` prints it (32 bytes, clamped as WireGuard does)."""
    raw = bytearray(X25519PrivateKey.generate().private_bytes_raw())
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return base64.b64encode(bytes(raw)).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 WireGuard key; ``ValueError`` if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes, a WireGuard key has 32")
    return raw


def public_key(private_key: str) -> str:
    """The public key of a base64 private key, as `wg pubkey` prints it."""
    key = X25519PrivateKey.from_private_bytes(decode_key(private_key))
    return base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii")


def key_dir(state_dir: Path | StateDir, fleet_name: str) -> Path:
    root = state_dir.root if isinstance(state_dir, StateDir) else state_dir
    return root / "mesh" / fleet_name


def private_key_file(state_dir: Path | StateDir, fleet_name: str, host: str) -> Path:
    """The file with ``host``'s private key (deploy copies it to ``PRIVATE_KEY_PATH`` on the host)."""
    return key_dir(state_dir, fleet_name) / f"{host}.key"


def public_key_file(state_dir: Path | StateDir, fleet_name: str, host: str) -> Path:
    return key_dir(state_dir, fleet_name) / f"{host}.pub"


@dataclass(frozen=True)
class KeysReport:
    public_keys: dict[str, str]  # host → public key, hosts by name
    generated: list[str] = field(default_factory=list)  # hosts whose pair this call made (new or rotated)
    folder: Path | None = None


def ensure_keys(state_dir: Path | StateDir, fleet: Fleet, rotate: Collection[str] = ()) -> dict[str, str]:
    """Each host's public key, making a pair for a host that has none; ``{}`` unless the mesh is WireGuard."""
    return ensure_keys_report(state_dir, fleet, rotate).public_keys


def ensure_keys_report(state_dir: Path | StateDir, fleet: Fleet, rotate: Collection[str] = ()) -> KeysReport:
    """``ensure_keys``, also saying which pairs were made. ``rotate``: hosts whose pair is replaced by a new one."""
    if fleet.mesh.kind != "wireguard":
        return KeysReport({})
    names = sorted(h.name for h in fleet.hosts or [])
    unknown = sorted(set(rotate) - set(names))
    if unknown:
        raise SpecError(
            f"cannot rotate the key of {', '.join(unknown)}: not a host of fleet {fleet.name} "
            f"(hosts: {', '.join(names)})"
        )
    folder = key_dir(state_dir, fleet.name)
    _ensure_private_dir(folder.parent)
    _ensure_private_dir(folder)
    keys: dict[str, str] = {}
    generated: list[str] = []
    for name in names:
        key_path = folder / f"{name}.key"
        if name in rotate:
            _replace_key(key_path, generate_private_key())
            generated.append(name)
        elif _create_once(key_path, generate_private_key()):
            generated.append(name)
        private = _read_private_key(key_path)
        public = public_key(private)
        pub_path = folder / f"{name}.pub"
        if _read_text(pub_path) != public + "\n":
            write_file(pub_path, public + "\n", mode=0o644)
        keys[name] = public
    return KeysReport(keys, generated, folder)


def read_private_key(state_dir: Path | StateDir, fleet_name: str, host: str) -> str:
    """``host``'s private key (checked: mode 0600, a valid key). Never print or log it."""
    return _read_private_key(private_key_file(state_dir, fleet_name, host))


def _ensure_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise MeshKeyError(f"{path}: cannot create the mesh key folder ({exc.strerror}); check --state-dir") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise MeshKeyError(f"{path}: not a folder; move it away so the mesh keys can be kept there")
    if info.st_mode & 0o077:
        raise MeshKeyError(
            f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others in; it holds private keys: chmod 700 {path}"
        )


def _read_private_key(path: Path) -> str:
    try:
        info = path.lstat()
    except FileNotFoundError as exc:
        raise MeshKeyError(f"{path}: no such key; run `controller mesh SPEC` to make the mesh keys") from exc
    if not stat.S_ISREG(info.st_mode):
        raise MeshKeyError(f"{path}: not a regular file; remove it and run `controller mesh` to make a new key")
    if info.st_mode & 0o077:
        raise MeshKeyError(
            f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read a private key; chmod 600 {path} "
            "(and consider `controller mesh --rotate HOST` if others may have read it)"
        )
    text = _read_text(path)
    try:
        if text is None:
            raise ValueError("unreadable or not text")
        decode_key(text)
    except ValueError as exc:
        # The message never quotes the content: it may be a key.
        raise MeshKeyError(
            f"{path}: not a WireGuard private key ({exc}); restore it from a backup, or remove it and its .pub "
            "and run `controller mesh` for a new one (then redeploy every host)"
        ) from exc
    assert text is not None
    return text.strip()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None


def _staged(path: Path, text: str, mode: int) -> str:
    """A flushed temporary sibling of ``path`` holding ``text`` with ``mode`` (private from the start)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _create_once(path: Path, private_key: str) -> bool:
    """Write a new key file unless one exists; True if this call made it. Two racing runs keep one key."""
    if path.exists() or path.is_symlink():
        return False
    tmp = _staged(path, private_key + "\n", KEY_MODE)
    try:
        os.link(tmp, path)  # fails if the file exists: never replaces a key
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


def _replace_key(path: Path, private_key: str) -> None:
    write_file(path, private_key + "\n", mode=KEY_MODE)  # its temporary file is 0600 from the start (mkstemp)


# -- the mesh -------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    name: str
    public_key: str
    allowed_ips: str
    endpoint: str | None
    keepalive: int | None


@dataclass(frozen=True)
class HostMesh:
    """One host's side of the mesh: what its config says."""

    name: str
    interface: str
    address: str  # with the subnet's prefix, e.g. 10.77.0.1/24
    listen_port: int
    public_key: str
    endpoint: str | None
    peers: tuple[Peer, ...]

    @property
    def path(self) -> str:
        return f"{self.name}/wireguard/{self.interface}.conf"


def _fleet(source: Plan | Fleet) -> Fleet:
    return source.fleet if isinstance(source, Plan) else source


def _default_problem(fleet: Fleet) -> ProblemAt:
    def problem(path: tuple[str | int, ...], message: str) -> Problem:
        return Problem(f"fleet {fleet.name}", None, dotted(path), message)

    return problem


def mesh_problems(source: Plan | Fleet, problem: ProblemAt | None = None) -> list[Problem]:
    """Why this fleet's WireGuard mesh cannot be built; ``[]`` when it can (or the mesh is not WireGuard)."""
    fleet = _fleet(source)
    at = problem or _default_problem(fleet)
    mesh = fleet.mesh
    hosts = fleet.hosts or []
    if mesh.kind != "wireguard":
        return []
    out: list[Problem] = []
    subnet = mesh.subnet
    if subnet is None:
        return [at(("mesh", "subnet"), "mesh kind 'wireguard' needs `subnet` (e.g. 10.77.0.0/24)")]
    owner: dict[str, str] = {}
    for i, host in enumerate(hosts):
        where: tuple[str | int, ...] = ("hosts", i, "address")
        addr = host.address
        if not isinstance(addr, ipaddress.IPv4Address) or addr not in subnet:
            out.append(
                at(where, f"host {host.name}: address {addr} is outside the mesh subnet {subnet}; pick one in it")
            )
        elif subnet.prefixlen < 31 and addr in (subnet.network_address, subnet.broadcast_address):
            kind = "network" if addr == subnet.network_address else "broadcast"
            out.append(at(where, f"host {host.name}: address {addr} is the {kind} address of {subnet}; pick another"))
        if str(addr) in owner:
            out.append(at(where, f"host {host.name}: address {addr} is already host {owner[str(addr)]}'s"))
        owner.setdefault(str(addr), host.name)
    with_endpoint = {h.name for h in hosts if h.endpoint}
    if len(hosts) > 1:
        for i, host in enumerate(hosts):
            if host.endpoint or with_endpoint - {host.name}:
                continue
            out.append(
                at(
                    ("hosts", i, "endpoint"),
                    f"host {host.name}: unreachable: neither it nor any peer has `endpoint`; give it (or a peer) "
                    "a public host[:port] that peers dial",
                )
            )
    gateway = fleet.gateway.host
    if with_endpoint and gateway not in with_endpoint and any(h.name == gateway for h in hosts):
        stranded = sorted(h.name for h in hosts if h.name != gateway and not h.endpoint)
        if stranded:
            gi = next(i for i, h in enumerate(hosts) if h.name == gateway)
            out.append(
                at(
                    ("hosts", gi, "endpoint"),
                    f"host {gateway}: the gateway and {', '.join(stranded)} all lack `endpoint`, so the gateway "
                    "cannot reach them; give the gateway (or them) a public host[:port]",
                )
            )
    return out


def check_mesh(source: Plan | Fleet, problem: ProblemAt | None = None) -> None:
    """Raise ``SpecError`` listing every reason the WireGuard mesh cannot be built."""
    problems = mesh_problems(source, problem)
    if problems:
        raise SpecError(f"the WireGuard mesh of fleet {_fleet(source).name}: {len(problems)} problem(s)", problems)


def unreachable_pairs(source: Plan | Fleet) -> list[tuple[str, str]]:
    """Host pairs that cannot reach each other: both lack an endpoint (only the WireGuard mesh)."""
    fleet = _fleet(source)
    if fleet.mesh.kind != "wireguard":
        return []
    behind = sorted(h.name for h in fleet.hosts or [] if not h.endpoint)
    return [(a, b) for i, a in enumerate(behind) for b in behind[i + 1 :]]


def dial_endpoint(host: Host, listen_port: int) -> str | None:
    """Where peers send ``host``'s packets: its endpoint, with the mesh's listen port when it names none."""
    if not host.endpoint:
        return None
    return host.endpoint if ":" in host.endpoint else f"{host.endpoint}:{listen_port}"


def mesh_hosts(
    source: Plan | Fleet, public_keys: Mapping[str, str], problem: ProblemAt | None = None
) -> list[HostMesh]:
    """Every host's side of the mesh, hosts and peers by name; ``[]`` unless the mesh is WireGuard."""
    fleet = _fleet(source)
    mesh = fleet.mesh
    if mesh.kind != "wireguard":
        return []
    check_mesh(fleet, problem)
    assert mesh.subnet is not None
    hosts = sorted(fleet.hosts or [], key=lambda h: h.name)
    missing = [h.name for h in hosts if h.name not in public_keys]
    if missing:
        raise MeshKeyError(f"no public key for host(s) {', '.join(missing)}; run `controller mesh SPEC` to make them")
    for h in hosts:
        try:
            decode_key(public_keys[h.name])
        except ValueError as exc:
            raise MeshKeyError(f"host {h.name}: public key is not a WireGuard key ({exc})") from exc
    # Every host is every other's peer (a full mesh: its configs grow with the square of the hosts); what a peer
    # is does not depend on whose config it is in, so it is worked out once per host.
    ends = {h.name: dial_endpoint(h, mesh.listen_port) for h in hosts}
    ips = {h.name: f"{h.address}/32" for h in hosts}
    out: list[HostMesh] = []
    for host in hosts:
        peers = tuple(
            Peer(
                name=peer.name,
                public_key=public_keys[peer.name],
                allowed_ips=ips[peer.name],
                endpoint=ends[peer.name],
                keepalive=KEEPALIVE_S if not host.endpoint and peer.endpoint else None,
            )
            for peer in hosts
            if peer.name != host.name
        )
        out.append(
            HostMesh(
                name=host.name,
                interface=mesh.interface,
                address=f"{host.address}/{mesh.subnet.prefixlen}",
                listen_port=mesh.listen_port,
                public_key=public_keys[host.name],
                endpoint=ends[host.name],
                peers=peers,
            )
        )
    return out


def render_config(host: HostMesh) -> str:
    """``host``'s wg-quick config: public keys only; the private key is loaded from ``PRIVATE_KEY_PATH``."""
    lines = [
        HEADER.rstrip("\n"),
        f"# Host {host.name}; public key {host.public_key}",
        "[Interface]",
        f"Address = {host.address}",
        f"ListenPort = {host.listen_port}",
        f"PostUp = wg set %i private-key {PRIVATE_KEY_PATH}",
    ]
    for peer in host.peers:
        lines += ["", f"# {peer.name}", "[Peer]", f"PublicKey = {peer.public_key}", f"AllowedIPs = {peer.allowed_ips}"]
        if peer.endpoint:
            lines.append(f"Endpoint = {peer.endpoint}")
        if peer.keepalive:
            lines.append(f"PersistentKeepalive = {peer.keepalive}")
    return "\n".join(lines) + "\n"


def mesh_configs(
    source: Plan | Fleet, public_keys: Mapping[str, str], problem: ProblemAt | None = None
) -> dict[str, str]:
    """Per host ``<host>/wireguard/<interface>.conf`` (wg-quick format); ``{}`` unless the mesh is WireGuard."""
    return {h.path: render_config(h) for h in mesh_hosts(source, public_keys, problem)}


def syncconf_text(conf: str, private_key: str | None = None) -> str:
    """What `wg-quick strip` prints for ``conf``: the config without wg-quick's own [Interface] keys, for
    `wg syncconf` / `wg setconf`. Comments and blank lines stay, as wg-quick keeps them.

    Beware: `wg syncconf` sets the whole interface, so a text without ``PrivateKey`` *clears* the live key
    (and with it every session). To update a running interface, give ``private_key`` (the text then goes
    to the host over a pipe, e.g. ssh stdin to `wg syncconf IFACE /dev/stdin`, never to a file), or run
    ``host_sync_command`` on the host, which adds the key from ``PRIVATE_KEY_PATH`` there. Setting the key
    the interface already has changes nothing, so peers and their sessions are kept.
    """
    if private_key is not None:
        decode_key(private_key)
        conf = f"[Interface]\nPrivateKey = {private_key.strip()}\n" + conf
    out: list[str] = []
    in_interface = False
    for line in conf.splitlines():
        stripped = line.split("#", 1)[0].strip()
        key = stripped.split("=", 1)[0].strip()
        if key.startswith("["):
            in_interface = key.lower() == "[interface]"
        if in_interface and "=" in stripped and key.lower() in WG_QUICK_ONLY:
            continue
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


def host_sync_command(interface: str, stripped_path: str, key_path: str = PRIVATE_KEY_PATH) -> str:
    """A POSIX sh command, run as root on a host, that applies the stripped config at ``stripped_path`` to the
    live ``interface`` and keeps its private key (read from ``key_path`` into a private temporary file)."""
    for value in (interface, stripped_path, key_path):
        if not value or "'" in value:
            raise ValueError(f"unusable in a shell command: {value!r}")
    return (
        "set -e; umask 077; f=$(mktemp); trap 'rm -f \"$f\"' EXIT; "
        f"{{ printf '[Interface]\\nPrivateKey = '; cat '{key_path}'; cat '{stripped_path}'; }} > \"$f\"; "
        f"wg syncconf '{interface}' \"$f\""
    )


__all__ = [
    "HEADER",
    "KEEPALIVE_S",
    "PRIVATE_KEY_PATH",
    "HostMesh",
    "KeysReport",
    "MeshKeyError",
    "Peer",
    "check_mesh",
    "decode_key",
    "dial_endpoint",
    "ensure_keys",
    "ensure_keys_report",
    "generate_private_key",
    "host_sync_command",
    "key_dir",
    "mesh_configs",
    "mesh_hosts",
    "mesh_problems",
    "private_key_file",
    "public_key",
    "public_key_file",
    "read_private_key",
    "render_config",
    "syncconf_text",
    "unreachable_pairs",
]
