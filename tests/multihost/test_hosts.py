"""The fake hosts themselves: what the `controller deploy` tests rely on, checked over SSH the way deploy reaches them.

Each host answers as itself, has only its own address, reaches the others over the underlay, has its own container
store, /etc, /var and /run (a file written on one is absent on the others and on the machine), and pins containers
to its fake GPUs by CDI name; teardown leaves nothing behind, also after a setup that failed halfway or a killed run.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.multihost.conftest import FLEET, IMAGE, need_hosts
from tests.multihost.hosts import (
    OWNER_ALIAS,
    PREFIX,
    Host,
    Hosts,
    HostSpec,
    _netns_pids,
    fake_gpu_uuid,
    remove_stale,
)
from tests.stubs import wait_until

pytestmark = pytest.mark.multihost
NAMES = [spec.name for spec in FLEET]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {entry["name"] for entry in json.loads(out or "[]")}


def link_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def pids_running(argv: list[str]) -> list[int]:
    """Processes of the machine (any namespace) whose command line is exactly ``argv``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if [part.decode(errors="replace") for part in cmdline] == argv:
                found.append(int(entry.name))
    return found


def assert_nothing_left(hosts: Hosts) -> None:
    assert not {n for n in netns_names() if f"-{hosts.tag}-" in n}, "a netns of this fleet is left"
    assert not {n for n in link_names() if n.startswith(hosts.bridge)}, "its bridge or a veth is left"
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(hosts.folder) in line]
    assert mounts == []


@pytest.mark.timeout(60)
def test_bring_up_time(fleet_hosts: Hosts, note: Callable[[str], None]) -> None:
    assert [host.name for host in fleet_hosts] == NAMES
    assert all(host.init_pid is not None for host in fleet_hosts)
    assert 0 < fleet_hosts.setup_seconds < 60
    note(f"{len(NAMES)} fake hosts up (netns, sshd, private mounts) in {fleet_hosts.setup_seconds:.2f} s")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NAMES)
def test_host_answers_as_itself_over_ssh(fleet_hosts: Hosts, name: str) -> None:
    host = fleet_hosts[name]
    assert host.run("hostname").stdout.strip() == name
    assert host.run("cat /etc/hostname").stdout.strip() == name
    by_name = subprocess.run(
        ["ssh", "-F", str(fleet_hosts.ssh_config), name, "hostname"], capture_output=True, text=True, timeout=30
    )
    assert (by_name.returncode, by_name.stdout.strip()) == (0, name), by_name.stderr
    assert host.exec(["hostname"]).stdout.strip() == name  # nsenter: the same host
    addresses = re.findall(r"inet (\S+)/", host.run("ip -4 -o addr show").stdout)
    assert sorted(addresses) == sorted(["127.0.0.1", host.address])  # no other host's, no machine's
    assert host.run("ls /sys/class/net").stdout.split() == ["eth0", "lo"]


@pytest.mark.timeout(60)
def test_ssh_takes_the_laptop_key_only(fleet_hosts: Hosts, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host = fleet_hosts["gpu1"]
    options = [f"UserKnownHostsFile={fleet_hosts.known_hosts}", "StrictHostKeyChecking=yes", "BatchMode=yes"]
    options += ["IdentitiesOnly=yes", f"IdentityFile={other}"]
    argv = ["ssh", "-F", "/dev/null", *(f"-o{option}" for option in options), host.ssh_target, "true"]
    wrong = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 255 and "Permission denied" in wrong.stderr, wrong.stderr


@pytest.mark.timeout(60)
def test_every_host_reaches_every_other_over_the_underlay(fleet_hosts: Hosts) -> None:
    for source in fleet_hosts:
        for target in fleet_hosts:
            if target is source:
                continue
            banner = source.run(f"timeout 10 bash -c 'exec 3<>/dev/tcp/{target.address}/22; head -c 8 <&3'")
            assert banner.stdout.startswith("SSH-2.0"), f"{source.name} -> {target.name}: {banner.stdout!r}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NAMES)
def test_python_for_ansible(fleet_hosts: Hosts, name: str) -> None:
    out = fleet_hosts[name].run("/usr/bin/python3 -c 'import json, sys; print(json.dumps(sys.version_info[:2]))'")
    assert json.loads(out.stdout)[0] == 3


@pytest.mark.timeout(60)
def test_host_mounts_stay_out_of_the_machine(fleet_hosts: Hosts) -> None:
    """Propagation: the hosts' overlays and binds exist in their own mount namespaces only."""
    mine = Path("/proc/self/mountinfo").read_text()
    assert str(fleet_hosts.folder) not in mine
    for host in fleet_hosts:
        theirs = host.run("cat /proc/self/mountinfo").stdout
        for mountpoint in ("/etc", "/var", "/var/lib/containers", "/run", "/dev/shm", "/sys/fs/cgroup"):
            assert re.search(rf"^\S+ \S+ \S+ \S+ {re.escape(mountpoint)} ", theirs, re.M), (host.name, mountpoint)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "folder",
    ["/var/log/fleet", "/var/lib/fleet", "/run/wireguard", "/etc/fleet", "/etc/wireguard", "/run/podman", "/tmp"],
)
def test_paths_are_private_per_host(fleet_hosts: Hosts, folder: str) -> None:
    """A file written on gpu1 is absent on gpu2, on the gateway and on the machine (/tmp, shared, is the control)."""
    marker = f"{folder}/marker-{random.getrandbits(32):08x}"
    writer = fleet_hosts["gpu1"]
    writer.run(f"mkdir -p {folder} && echo gpu1 > {marker}")
    try:
        assert writer.exec(["cat", marker]).stdout == "gpu1\n"
        seen = {h.name: h.run(f"test -e {marker}", check=False).returncode == 0 for h in fleet_hosts}
        seen["machine"] = os.path.exists(marker)
        shared = folder.startswith("/tmp")
        assert seen == {"gateway": shared, "gpu1": True, "gpu2": shared, "machine": shared}
    finally:
        writer.run(f"rm -f {marker}")


@pytest.mark.timeout(120)
def test_each_host_has_its_own_container_store(fleet_hosts: Hosts, busybox_tar: bytes) -> None:
    stores = set()
    for host in fleet_hosts:
        info = host.run(
            "podman info --format '{{.Store.GraphRoot}} {{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}}'"
        )
        assert info.stdout.split() == ["/var/lib/containers/storage", "vfs", "runc"]
        stores.add(host.run("stat -c %d:%i /var/lib/containers/storage").stdout.strip())
        assert (host.folder / "containers" / "storage").is_dir()  # the bind's source
    assert len(stores) == len(NAMES)
    only = "localhost/fmh-only-gpu1:1"
    fleet_hosts["gpu1"].import_image(busybox_tar, only)
    present = {h.name: h.run(f"podman image exists {only}", check=False).returncode for h in fleet_hosts}
    assert present == {"gateway": 1, "gpu1": 0, "gpu2": 1}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["gpu1", "gpu2"])
def test_cdi_pins_a_container_to_one_fake_gpu(fleet_hosts: Hosts, gpu_image: str, name: str) -> None:
    host = fleet_hosts[name]
    assert len(host.gpus) == {"gpu1": 2, "gpu2": 1}[name]
    for gpu in host.gpus:
        script = f"ls /dev; echo NVIDIA=$NVIDIA_VISIBLE_DEVICES; stat -c %t:%T {gpu.container_path}"
        out = host.run(f"podman run --rm --network none --device {gpu.cdi_device} {gpu_image} sh -c '{script}'").stdout
        assert [d for d in out.split() if d.startswith("nvidia")] == [gpu.container_path.removeprefix("/dev/")]
        assert f"NVIDIA={gpu.uuid}" in out.split()
        assert out.split()[-1] == "{:x}:{:x}".format(*gpu.device_number)
    plain = host.run(f"podman run --rm --network none {gpu_image} ls /dev").stdout
    assert not [d for d in plain.split() if d.startswith("nvidia")]


@pytest.mark.timeout(60)
def test_a_gpu_the_host_has_not_fails(fleet_hosts: Hosts, gpu_image: str) -> None:
    """An unknown UUID, and another host's GPU: podman refuses, naming the device."""
    host = fleet_hosts["gpu2"]
    for uuid in (fake_gpu_uuid(99, 0), fleet_hosts["gpu1"].gpus[0].uuid):
        device = f"nvidia.com/gpu={uuid}"
        result = host.run(f"podman run --rm --network none --device {device} {gpu_image} true", check=False)
        assert result.returncode != 0
        assert "unresolvable CDI devices" in result.stderr and device in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_gpu_data_for_a_fleet_spec(fleet_hosts: Hosts) -> None:
    uuids = [uuid for host in fleet_hosts for uuid in host.gpu_uuids]
    assert len(uuids) == 3 and len(set(uuids)) == 3
    assert fleet_hosts["gateway"].gpus == [] and not fleet_hosts["gateway"].cdi_spec_path.exists()
    spec = json.loads(fleet_hosts["gpu1"].cdi_spec_path.read_text())
    assert [d["name"] for d in spec["devices"]] == fleet_hosts["gpu1"].gpu_uuids
    assert fleet_hosts["gpu1"].gpus[1].as_spec() == {"uuid": uuids[1], "name": "Fake GPU", "vram_gib": 24}
    assert fleet_hosts.inventory.read_text().count("ansible_python_interpreter=/usr/bin/python3") == 3


@pytest.mark.timeout(120)
def test_teardown_leaves_nothing(tmp_path: Path, busybox_tar: bytes, note: Callable[[str], None]) -> None:
    """A host with a background process and a running container: after close, no process, netns, link or mount."""
    need_hosts()
    hosts = Hosts(tmp_path, [HostSpec("solo", gpus=1)])
    with hosts:
        host: Host = hosts["solo"]
        loose, boxed = (["sleep", str(random.randint(10**6, 10**7))] for _ in range(2))
        host.run(f"nohup {' '.join(loose)} >/dev/null 2>&1 &")
        host.import_image(busybox_tar, IMAGE)
        host.run(f"podman run -d --network none --device {host.gpus[0].cdi_device} {IMAGE} {' '.join(boxed)}")
        deadline = time.monotonic() + 10
        while not (pids_running(loose) and pids_running(boxed)) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = pids_running(loose) + pids_running(boxed)
        assert len(started) == 2
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()]
    assert_nothing_left(hosts)
    assert hosts.teardown_seconds < 30
    note(f"1 fake host with a container torn down in {hosts.teardown_seconds:.2f} s")


@pytest.mark.timeout(60)
def test_a_setup_failing_halfway_is_torn_down(tmp_path: Path) -> None:
    need_hosts()

    class Failing(Hosts):
        def _start_host(self, host: Host) -> None:
            if host.number == 1:
                raise RuntimeError("injected failure")
            super()._start_host(host)

    hosts = Failing(tmp_path, [HostSpec("one"), HostSpec("two", gpus=1)])
    with pytest.raises(RuntimeError, match="injected failure"):
        hosts.start()
    first = hosts["one"].process
    assert first is not None and first.poll() is not None
    assert_nothing_left(hosts)


@pytest.mark.timeout(60)
def test_leftovers_of_a_killed_run_are_removed() -> None:
    need_hosts()
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = f"{random.getrandbits(16):04x}"
    netns, bridge = f"{PREFIX}-{dead.pid}-{tag}-old", f"{PREFIX}{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", bridge, "alias", f"{OWNER_ALIAS}{dead.pid}"], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "1000"])
    try:
        # `ip netns exec` enters the netns a moment after it starts (later still on a loaded machine): an orphan
        # not in it yet is nothing to find, and it would outlive the netns (CI saw that once).
        wait_until(lambda: orphan.pid in _netns_pids(netns), 10, "the orphan inside its netns")
        removed = remove_stale()
        assert f"netns {netns}" in removed and f"bridge {bridge}" in removed
        assert orphan.wait(10) != 0  # killed (ip netns exec exec()s it, or reports its death)
        assert netns not in netns_names() and bridge not in link_names()
    finally:
        orphan.kill()
        orphan.wait()
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)
