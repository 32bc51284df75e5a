"""Fake hosts for the multihost tier: several "machines" on this one, reachable over SSH like real ones.

``Hosts(folder, [HostSpec("gateway"), HostSpec("gpu1", gpus=2), HostSpec("gpu2", gpus=1)])`` is a context manager;
inside it each host is

- a **network namespace** ``fmh-<owner pid>-<tag>-<name>`` (the owner pid and a random 4-hex tag per run, so parallel
  runs never clash and a killed run's leftovers are recognised and removed by the next run: `remove_stale`) with
  ``lo`` up and an ``eth0`` (a veth pair) on a bridge ``fmh<tag>`` in the root namespace. The bridge has
  ``10.<x>.<y>.1/24`` ("the ops laptop": this process, where the tests and ``controller deploy`` run); the hosts have
  ``.10``, ``.11``, ... in the order given, and every host reaches the laptop and every other host over it (the
  "underlay"). No default route: anything off the subnet is unreachable at once, as nothing outside is reachable here.
- a **process tree of its own**: ``nsenter --net=<netns> unshare --mount --uts --ipc --pid --fork --mount-proc`` runs
  the host's init script (``<folder>/init.sh``), which makes the host's private mounts and then ``exec``s sshd as the
  PID 1 of the host's PID namespace. Everything started over SSH (podman, conmon, containers, wireguard-go, ...) is in
  that PID namespace and that mount namespace, so (1) every SSH session sees the host's private filesystem and (2)
  killing the host's PID 1 kills everything the host ever started, containers included, and frees its mounts.
- a **filesystem of its own**, made by the init script inside the host's private mount namespace (propagation
  private: nothing leaks to the root namespace or to the other hosts):

  ==========================  =====================================================================================
  inside the host             where it lives (``<folder>`` = ``Host.folder``)
  ==========================  =====================================================================================
  /etc                        overlayfs: the machine's /etc below, ``<folder>/etc`` on top (all the host's own files:
                              hostname, hosts, machine-id, ssh/, containers/, cdi/, fleet/; anything deploy writes,
                              e.g. /etc/wireguard or /etc/containers/systemd, lands there too)
  /var                        overlayfs: the machine's /var below, ``<folder>/var`` on top (/var/log/fleet,
                              /var/lib/fleet, /var/lib/cni, /var/tmp, ... are per host)
  /var/lib/containers         bind of ``<folder>/containers`` (podman's store, vfs; kept off the overlay)
  /run                        bind of ``<folder>/run`` (/run/containers, /run/podman, /run/libpod, /run/wireguard,
                              /run/netns of podman's containers, /run/sshd, ...)
  /dev/shm                    a tmpfs of its own (podman's lock segment ``libpod_lock`` must not be shared)
  /sys                        a sysfs mounted in the host's netns (its own /sys/class/net), the machine's cgroup
                              mounts moved under it (runc needs /sys/fs/cgroup)
  /proc                       a proc of the host's PID namespace (``ps`` shows the host's processes only)
  hostname (UTS)              the host's name
  ==========================  =====================================================================================

  The rest (/usr, /bin, /root, /tmp, /dev) is the machine's. Why not ``/etc/netns/NAME`` with ``ip netns exec``
  (checked here): it binds only top-level entries that already exist in the machine's /etc (/etc/cdi and /etc/fleet
  do not: "Bind ... failed"), leaves every other /etc path shared (/etc/wireguard, /etc/containers/systemd), and it
  remounts /sys without the cgroup mounts, so runc fails ("no cgroup mount found in mountinfo").
- **sshd** on ``<address>:22`` (``<folder>/etc/ssh/sshd_config``): root by key only, the laptop's key in
  ``/etc/ssh/fleet_authorized_keys``, an ed25519 host key made per run, no PAM, log in ``<folder>/sshd.log``.
  ``ssh -F <Hosts.ssh_config> root@<address>`` (or ``<name>``) works without prompts (`Hosts.known_hosts` has every
  host key, `Hosts.ssh_key` is the laptop's key); the same file serves Ansible (`Hosts.inventory`).
- **podman** with this machine's facts (runc, cgroupfs, file events, no default ulimits; vfs storage at the default
  paths, so plain ``podman`` works over SSH). No registry is reachable: `busybox_image_tar` is a tiny image.
- **fake GPUs** (`FakeGpu`): a CDI spec ``/etc/cdi/nvidia.yaml`` (kind ``nvidia.com/gpu``, one device per GPU UUID)
  maps each GPU to a distinct character device made with mknod in ``<folder>/dev`` (/dev/null's, /dev/zero's, ...)
  at ``/dev/nvidia<index>`` in the container, with ``NVIDIA_VISIBLE_DEVICES=<uuid>`` as NVIDIA's toolkit sets it, so
  ``podman run --device nvidia.com/gpu=<uuid>`` pins a container to one fake GPU as on a real host.

`Host.run` runs a command over SSH (the path Ansible and deploy take); `Host.exec` runs one directly with
``nsenter`` into the host's PID 1's namespaces (same view, no sshd needed, faster).

Teardown (`Hosts.close`, also when a test or the setup itself fails halfway) kills each host's PID 1 (the kernel then
kills the rest of its PID namespace), deletes its veth (a deleted netns would take it down only later, in the
kernel's own time), kills anything else left in its netns (``ip netns pids``), deletes the netns and the bridge, and checks that no mount of a host folder is left in the root namespace. The
host folders stay (logs to read after a failure); the caller owns and removes them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.podman_service import CONTAINERS_CONF  # this machine's podman facts, as every test store

PREFIX = "fmh"  # netns fmh-<pid>-<tag>-<name>, bridge fmh<tag>, root-side veths fmh<tag>h<index>
OWNER_ALIAS = "fleet-multihost owner pid="  # the bridge's alias: which process made it
FIRST_HOST = 10  # host addresses: .10, .11, ...
NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 30.0  # sshd answers about 0.1 s after the start here; a loaded 2-core machine is far slower
# The fake GPUs' device nodes: harmless character devices, a different one per GPU index (cycled past five).
DEVICE_NUMBERS = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)]  # null, zero, full, random, urandom

STORAGE_CONF = """\
# Written by tests/multihost/hosts.py: the default paths, which are the host's own (private mounts).
[storage]
driver = "vfs"
graphroot = "/var/lib/containers/storage"
runroot = "/run/containers/storage"
"""
SSHD_CONFIG = """\
# Written by tests/multihost/hosts.py for the fake host {name}.
ListenAddress {address}
Port 22
HostKey /etc/ssh/fleet_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /etc/ssh/fleet_authorized_keys
UsePAM no
PidFile /run/sshd.pid
# no AcceptEnv: sessions get sshd's environment only
PrintMotd no
UseDNS no
MaxStartups 64
MaxSessions 64
Subsystem sftp internal-sftp
"""
# Runs as PID 1 of the host's new PID namespace, in its new (private) mount namespace, inside its netns.
INIT_SCRIPT = """\
set -eu
F={folder}
# /sys: a sysfs of this netns (its own /sys/class/net), with the machine's cgroup mounts moved under it for runc.
mount --rbind /sys/fs/cgroup "$F/.cgroup"
umount -l /sys
mount -t sysfs sysfs /sys
mount --move "$F/.cgroup" /sys/fs/cgroup
# /etc and /var: the machine's, with the host's own files on top; writes land in the host's folder.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$F/etc,workdir=$F/.etc-work" /etc
mount -t overlay overlay -o "lowerdir=/var,upperdir=$F/var,workdir=$F/.var-work" /var
mkdir -p /var/lib/containers /var/log/fleet /var/lib/fleet
mount --bind "$F/containers" /var/lib/containers
mount --bind "$F/run" /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname {name}
exec {sshd} -D -f /etc/ssh/sshd_config -E "$F/sshd.log"
"""


class HostCommandError(RuntimeError):
    """A command on a host exited non-zero; the message has the host, the command, the exit status and its stderr."""

    def __init__(self, host: str, command: str, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"{host}: {command!r} exited {result.returncode}\nstdout: {result.stdout[-2000:]}\n"
            f"stderr: {result.stderr[-2000:]}"
        )


@dataclass(frozen=True)
class HostSpec:
    """What to make: a host's name (``[a-z][a-z0-9-]*``, at most 31 characters) and how many fake GPUs it has."""

    name: str
    gpus: int = 0


@dataclass(frozen=True)
class FakeGpu:
    """One fake GPU of a host, as a fleet spec names it (`as_spec`) and as podman's CDI sees it (`cdi_device`)."""

    index: int  # its number on the host: /dev/nvidia<index> in the container
    uuid: str  # GPU-00000000-0000-4000-8000-<host number, 8 hex><index, 4 hex>: the same every run
    node: Path  # the device node on the machine (mknod, in <host folder>/dev); CDI's hostPath
    device_number: tuple[int, int]  # (major, minor) of ``node``
    name: str = "Fake GPU"
    vram_gib: int = 24

    @property
    def container_path(self) -> str:
        return f"/dev/nvidia{self.index}"

    @property
    def cdi_device(self) -> str:
        """The name for ``podman run --device``: ``nvidia.com/gpu=<uuid>``."""
        return f"nvidia.com/gpu={self.uuid}"

    def as_spec(self) -> dict[str, Any]:
        """The GPU as a fleet spec's ``hosts[].gpus[]`` entry."""
        return {"uuid": self.uuid, "name": self.name, "vram_gib": self.vram_gib}


def fake_gpu_uuid(host_number: int, index: int) -> str:
    return f"GPU-00000000-0000-4000-8000-{host_number:08x}{index:04x}"


def cdi_spec(gpus: Sequence[FakeGpu]) -> str:
    """The CDI spec of a host's fake GPUs (JSON is YAML; podman 4.3 reads cdiVersion 0.5.0)."""
    devices = [
        {
            "name": gpu.uuid,
            "containerEdits": {
                "env": [f"NVIDIA_VISIBLE_DEVICES={gpu.uuid}"],
                "deviceNodes": [{"path": gpu.container_path, "hostPath": str(gpu.node), "permissions": "rw"}],
            },
        }
        for gpu in gpus
    ]
    return json.dumps({"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": devices}, indent=2) + "\n"


def _completed(
    argv: Sequence[str], stdin: bytes | str | None, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    raw = subprocess.run(list(argv), input=data, capture_output=True, timeout=timeout, check=False, env=env)
    out, err = raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
    return subprocess.CompletedProcess(raw.args, raw.returncode, out, err)


def _ip(*args: str, check: bool = True) -> str:
    """An ``ip`` command in the root namespace; its output, or an error with ip's message."""
    result = _completed(["ip", *args], None, 30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _netns_pids(netns: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", netns, check=False).split()]


def _kill_netns(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL everything in ``netns`` until nothing is left (a PID 1's death takes its namespace down a moment
    later), then delete the netns (the veth inside goes with it)."""
    deadline = time.monotonic() + timeout
    while pids := _netns_pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} still in netns {netns} after {timeout} s of SIGKILL")
        time.sleep(0.05)
    _ip("netns", "delete", netns)


def remove_stale() -> list[str]:
    """Remove what earlier runs left (a killed pytest): netns ``fmh-<pid>-...`` and bridges ``fmh<tag>`` whose owner
    process is gone, with everything still running in them. Returns what it removed."""
    removed: list[str] = []
    for entry in json.loads(_ip("-j", "netns", "list") or "[]"):
        name = entry["name"]
        match = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-f]{{4}}-.+", name)
        if match and not _alive(int(match[1])):
            _kill_netns(name)
            removed.append(f"netns {name}")
    for link in json.loads(_ip("-j", "link", "show", "type", "bridge") or "[]"):
        alias = link.get("ifalias", "")
        if link["ifname"].startswith(PREFIX) and alias.startswith(OWNER_ALIAS):
            pid = alias.removeprefix(OWNER_ALIAS)
            if pid.isdigit() and not _alive(int(pid)):
                _ip("link", "delete", link["ifname"], check=False)
                removed.append(f"bridge {link['ifname']}")
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.160.0.0/11 that no address or route of this machine overlaps (away from podman's 10.88/16)."""
    used = [
        ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]")
        for a in link.get("addr_info", [])
    ]
    used += [
        ipaddress.ip_network(r["dst"])
        for r in json.loads(_ip("-j", "-4", "route", "show") or "[]")
        if r["dst"] != "default"
    ]
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randint(160, 191)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.160.0.0/11 /24 for the multihost bridge")


def busybox_image_tar() -> bytes:
    """A root filesystem tarball for ``podman import``: /bin/busybox, the libraries it links to (Debian's busybox is
    dynamic) and a few applet symlinks (sh, ls, cat, env, ...). No registry is reachable here."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not found (apt-get install busybox)")
    ldd = _completed(["ldd", busybox], None, 30)
    libs = re.findall(r"(/\S+) \(0x", ldd.stdout)  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and ld.so
    path = Path("/tmp") / f"{PREFIX}-image-{os.getpid()}-{random.getrandbits(32):08x}.tar"
    try:
        with tarfile.open(path, "w") as tar:
            for folder in ("tmp", "dev", "proc", "sys", "etc"):
                info = tarfile.TarInfo(folder)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
                tar.addfile(info)
            tar.add(busybox, "bin/busybox")
            for lib in libs:
                tar.add(os.path.realpath(lib), lib.lstrip("/"))
            for applet in ("sh", "ls", "cat", "env", "echo", "sleep", "test", "hostname", "wc", "grep", "stat"):
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


@dataclass
class Host:
    """One fake host. ``run`` (over SSH) and ``exec`` (nsenter) run commands on it; the other attributes are data."""

    name: str
    number: int  # its position in the fleet, from 0
    address: str  # its underlay address (10.x.y.10, .11, ...), where sshd listens
    netns: str  # its network namespace (``ip netns``): fmh-<pid>-<tag>-<name>
    veth: str  # the root namespace's end of its eth0, on the bridge: fmh<tag>h<number>
    folder: Path  # its files on the machine; see the module docstring for the layout
    ssh_config: Path  # the fleet's ssh_config: ``ssh -F ssh_config root@address``
    gpus: list[FakeGpu] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None  # unshare, the parent of the host's PID 1
    init_pid: int | None = None  # the host's PID 1 (sshd), as the machine's PID namespace numbers it

    @property
    def ssh_target(self) -> str:
        return f"root@{self.address}"

    @property
    def gpu_uuids(self) -> list[str]:
        return [gpu.uuid for gpu in self.gpus]

    @property
    def etc(self) -> Path:
        """The top layer of the host's /etc: what the host has of its own (or what was written there)."""
        return self.folder / "etc"

    @property
    def cdi_spec_path(self) -> Path:
        return self.etc / "cdi" / "nvidia.yaml"

    @property
    def sshd_log(self) -> Path:
        return self.folder / "sshd.log"

    def ssh_command(self, command: str) -> list[str]:
        """The argv that runs ``command`` (a shell command line) on this host over SSH from the laptop."""
        return ["ssh", "-F", str(self.ssh_config), self.ssh_target, command]

    def run(
        self, command: str, *, stdin: bytes | str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command line on the host over SSH, as root, by key; ``check``: raise `HostCommandError` if it
        exits non-zero (with its stderr)."""
        result = _completed(self.ssh_command(command), stdin, timeout)
        if check and result.returncode != 0:
            raise HostCommandError(self.name, command, result)
        return result

    def exec(
        self, argv: Sequence[str], *, stdin: bytes | str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the host without SSH: ``nsenter`` into all the namespaces of its PID 1 (network, mount,
        UTS, IPC, PID), with a clean environment like an SSH session's."""
        if self.init_pid is None:
            raise RuntimeError(f"{self.name} is not running")
        env = {"PATH": PATH, "HOME": "/root", "USER": "root", "LANG": "C.UTF-8"}
        result = _completed(["nsenter", "-t", str(self.init_pid), "-a", "--", *argv], stdin, timeout, env)
        if check and result.returncode != 0:
            raise HostCommandError(self.name, " ".join(argv), result)
        return result

    def import_image(self, tar: bytes, reference: str) -> str:
        """``podman import`` a root filesystem tarball into the host's own store as ``reference``; the image id."""
        return self.run(f"podman import - {reference}", stdin=tar, timeout=120).stdout.strip().splitlines()[-1]

    def inventory_line(self) -> str:
        return (
            f"{self.name} ansible_host={self.address} ansible_user=root "
            f"ansible_python_interpreter=/usr/bin/python3 ansible_ssh_common_args='-F {self.ssh_config}'"
        )


class Hosts:
    """A context manager: the fake hosts, up and reachable over SSH inside the ``with``, gone after it (see the
    module docstring). ``hosts["gpu1"]`` or ``hosts.hosts`` (in the order given) are `Host` objects."""

    def __init__(self, folder: Path, specs: Sequence[HostSpec]) -> None:
        names = [spec.name for spec in specs]
        if not specs or len(set(names)) != len(names) or not all(NAME.fullmatch(n) for n in names):
            raise ValueError(f"host names must be distinct and match {NAME.pattern}: {names}")
        self.folder = folder  # keep it short: everything of the fleet is under it
        self.tag = f"{random.getrandbits(16):04x}"
        self.bridge = f"{PREFIX}{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.laptop_address = ""  # the bridge's address, 10.x.y.1: where the tests and deploy connect from
        laptop = folder / "laptop"
        self.ssh_key = laptop / "id_ed25519"  # the laptop's key (no passphrase); .pub next to it
        self.known_hosts = laptop / "known_hosts"
        self.ssh_config = laptop / "ssh_config"
        self.inventory = laptop / "inventory.ini"  # an Ansible inventory of all hosts (ssh by ssh_config)
        self.specs = list(specs)
        self.hosts: list[Host] = []
        self.setup_seconds = 0.0
        self.teardown_seconds = 0.0
        self._made_bridge = False
        self._closed = False

    def __getitem__(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __enter__(self) -> Hosts:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Bring every host up (a failure halfway tears down what was made, then raises)."""
        began = time.monotonic()
        try:
            remove_stale()
            self._make_laptop()
            self._make_bridge()
            for number, spec in enumerate(self.specs):
                self._make_host(number, spec)
            self._write_ssh_files()
            for host in self.hosts:
                self._start_host(host)
            for host in self.hosts:
                self._wait_for_sshd(host)
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - began

    def _make_laptop(self) -> None:
        self.ssh_key.parent.mkdir(parents=True, exist_ok=True)
        _check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-multihost-laptop", "-f", str(self.ssh_key)])

    def _make_bridge(self) -> None:
        """The bridge with the laptop's address; its alias names the owner pid (for `remove_stale`). Bridged
        frames skip iptables (``nf_call_iptables 0``), whatever the machine's FORWARD policy."""
        self.subnet = _free_subnet()
        self.laptop_address = str(self.subnet.network_address + 1)
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _ip("link", "set", self.bridge, "alias", f"{OWNER_ALIAS}{os.getpid()}")
        _ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0")
        _ip("addr", "add", f"{self.laptop_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def _make_host(self, number: int, spec: HostSpec) -> Host:
        """The host's netns and veth, and its files (folder layout in the module docstring)."""
        assert self.subnet is not None
        folder = self.folder / spec.name
        host = Host(
            name=spec.name,
            number=number,
            address=str(self.subnet.network_address + FIRST_HOST + number),
            netns=f"{PREFIX}-{os.getpid()}-{self.tag}-{spec.name}",
            veth=f"{self.bridge}h{number}",
            folder=folder,
            ssh_config=self.ssh_config,
        )
        self.hosts.append(host)  # from here on, close() tears it down
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        self._write_host_files(host, spec)
        return host

    def _write_host_files(self, host: Host, spec: HostSpec) -> None:
        f = host.folder
        for sub in ("etc/ssh", "etc/containers", "etc/cdi", "etc/fleet", ".etc-work", "var", ".var-work"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("containers", "run/sshd", "run/lock", "dev", ".cgroup"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        (f / "run/sshd").chmod(0o755)
        etc = host.etc
        (etc / "hostname").write_text(f"{host.name}\n")
        (etc / "machine-id").write_text(f"{uuid.uuid4().hex}\n")
        assert self.subnet is not None
        others = "".join(
            f"{self.subnet.network_address + FIRST_HOST + n}\t{s.name}\n" for n, s in enumerate(self.specs)
        )
        (etc / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{self.laptop_address}\tlaptop\n{others}"
        )
        (etc / "ssh" / "sshd_config").write_text(SSHD_CONFIG.format(name=host.name, address=host.address))
        key = etc / "ssh" / "fleet_host_ed25519_key"
        _check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", str(key)])
        shutil.copyfile(self.ssh_key.with_suffix(".pub"), etc / "ssh" / "fleet_authorized_keys")
        (etc / "ssh" / "fleet_authorized_keys").chmod(0o600)
        (etc / "containers" / "containers.conf").write_text(CONTAINERS_CONF)
        (etc / "containers" / "storage.conf").write_text(STORAGE_CONF)
        for index in range(spec.gpus):
            major, minor = DEVICE_NUMBERS[index % len(DEVICE_NUMBERS)]
            node = f / "dev" / f"nvidia{index}"
            os.mknod(node, 0o666 | 0o020000, os.makedev(major, minor))  # S_IFCHR
            uuid_ = fake_gpu_uuid(host.number + 1, index)
            host.gpus.append(FakeGpu(index=index, uuid=uuid_, node=node, device_number=(major, minor)))
        if host.gpus:
            host.cdi_spec_path.write_text(cdi_spec(host.gpus))
        (f / "init.sh").write_text(INIT_SCRIPT.format(folder=f, name=host.name, sshd=SSHD))

    def _write_ssh_files(self) -> None:
        """known_hosts (each host by name and address), ssh_config (every host by name; any address works too), and
        an Ansible inventory using that ssh_config."""
        lines = []
        for host in self.hosts:
            key = (host.etc / "ssh" / "fleet_host_ed25519_key.pub").read_text().split()
            lines.append(f"{host.name},{host.address} {key[0]} {key[1]}\n")
        self.known_hosts.write_text("".join(lines))
        blocks = [f"Host {host.name}\n  HostName {host.address}\n\n" for host in self.hosts]
        self.ssh_config.write_text(
            "# Written by tests/multihost/hosts.py: the fake hosts, by name or address, as root by key.\n"
            + "".join(blocks)
            + "Host *\n"
            "  User root\n"
            f"  IdentityFile {self.ssh_key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  PasswordAuthentication no\n"
            "  ConnectTimeout 10\n"
            "  LogLevel ERROR\n"
        )
        self.inventory.write_text("[fleet]\n" + "".join(f"{h.inventory_line()}\n" for h in self.hosts))

    def _start_host(self, host: Host) -> None:
        """Start the host's PID 1: unshare (in the host's netns) forks the init script into new mount, UTS, IPC and
        PID namespaces; ``--kill-child``: if unshare dies, so does the host."""
        argv = [
            "nsenter",
            f"--net=/run/netns/{host.netns}",
            "--",
            "unshare",
            "--mount",
            "--uts",
            "--ipc",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "--kill-child",
            "/bin/sh",
            str(host.folder / "init.sh"),
        ]
        with (host.folder / "init.log").open("ab") as log:
            host.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _wait_for_sshd(self, host: Host) -> None:
        """Wait until the host's sshd accepts TCP connections; note its PID 1 (for `Host.exec` and teardown)."""
        assert host.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if host.process.poll() is not None:
                raise RuntimeError(f"{host.name} exited with {host.process.returncode}: {self._logs(host)}")
            try:
                with socket.create_connection((host.address, 22), timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{host.name}: sshd not answering after {START_TIMEOUT_S} s: {self._logs(host)}")
        children = _children(host.process.pid)
        if len(children) != 1:
            raise RuntimeError(f"{host.name}: expected one child of unshare, found {children}")
        host.init_pid = children[0]

    @staticmethod
    def _logs(host: Host) -> str:
        return " | ".join(
            f"{p.name}: {p.read_text(errors='replace')[-1500:]}"
            for p in (host.folder / "init.log", host.sshd_log)
            if p.exists()
        )

    def close(self) -> None:
        """Tear everything down, whatever state the setup reached; idempotent. Raises after trying every step if
        any failed (leftovers are then named in the error)."""
        if self._closed:
            return
        self._closed = True
        began = time.monotonic()
        errors: list[str] = []
        for host in self.hosts:
            try:
                if host.process is not None and host.process.poll() is None:
                    host.process.kill()  # unshare; --kill-child takes the host's PID 1, and so its PID namespace
                    host.process.wait(10)
                if host.init_pid is not None:
                    _wait_gone(host.init_pid, 10)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                errors.append(f"{host.name}: {e}")
        links = {link["ifname"] for link in json.loads(_ip("-j", "link", "show") or "[]")}
        for host in self.hosts:
            try:
                if host.veth in links:  # now: a deleted netns takes its veth down later, in the kernel's own time
                    _ip("link", "delete", host.veth)
                if Path("/run/netns", host.netns).exists():
                    _kill_netns(host.netns)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                errors.append(f"{host.name}: {e}")
        if self._made_bridge:
            try:
                _ip("link", "delete", self.bridge)
            except RuntimeError as e:
                errors.append(str(e))
        leftover = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(self.folder) in line]
        if leftover:
            errors.append(f"mounts of {self.folder} left in the root namespace: {leftover}")
        self.teardown_seconds = time.monotonic() - began
        if errors:
            raise RuntimeError("multihost teardown: " + "; ".join(errors))


def _check(argv: Sequence[str]) -> None:
    result = _completed(argv, None, 60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} still alive {timeout} s after its host was killed")
        time.sleep(0.02)
