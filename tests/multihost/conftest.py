"""The multihost tier's fixtures: the fake hosts (`tests.multihost.hosts`) the `controller deploy` tests deploy to.

They need root (namespaces, mounts, a bridge) and the machine's ``ip``, ``nsenter``/``unshare``, sshd, ssh, podman and
runc; without them the tests skip saying which is missing (and fail under FLEET_REQUIRE_TOOLS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.spec.models import Images
from tests.conftest import need_tool
from tests.images import build_fleet_images, build_stand_ins, podman_store
from tests.multihost.fleet import Deploy, Fleet, podman, write_fleet
from tests.multihost.hosts import SSHD, Hosts, HostSpec, busybox_image_tar

# The fleet every multihost test shares: a gateway without GPUs and two GPU hosts.
FLEET = [HostSpec("gateway"), HostSpec("gpu1", gpus=2), HostSpec("gpu2", gpus=1)]
IMAGE = "localhost/fmh-busybox:1"  # on gpu1 and gpu2 (`gpu_image`)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multihost: runs against fake hosts (namespaces with sshd and podman)")


def _cannot(reason: str) -> None:
    if os.environ.get("FLEET_REQUIRE_TOOLS") == "1":
        pytest.fail(reason + " (FLEET_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


def need_hosts() -> None:
    """Skip (fail under FLEET_REQUIRE_TOOLS=1) unless this machine can make fake hosts."""
    if os.geteuid() != 0:
        _cannot("the multihost tests need root (network and mount namespaces, a bridge)")
    need_tool("ip", "apt-get install iproute2")
    need_tool("nsenter", "apt-get install util-linux")
    need_tool("unshare", "apt-get install util-linux")
    if not Path(SSHD).exists():
        _cannot(f"{SSHD} not found; apt-get install openssh-server")
    need_tool("ssh", "apt-get install openssh-client")
    need_tool("ssh-keygen", "apt-get install openssh-client")
    need_tool("podman", "apt-get install podman")
    need_tool("runc", "apt-get install runc")
    need_tool("busybox", "apt-get install busybox")


@pytest.fixture(scope="session")
def fleet_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """gateway (no GPU), gpu1 (2 fake GPUs), gpu2 (1), up for the whole session; torn down at its end."""
    need_hosts()
    with Hosts(tmp_path_factory.mktemp("mh"), FLEET) as hosts:
        yield hosts


@pytest.fixture(scope="session")
def busybox_tar() -> bytes:
    """A tiny image's root filesystem (busybox and its libraries) for ``podman import``."""
    need_tool("busybox", "apt-get install busybox")
    return busybox_image_tar()


@pytest.fixture(scope="session")
def gpu_image(fleet_hosts: Hosts, busybox_tar: bytes) -> str:
    """`IMAGE`, imported into gpu1's and gpu2's stores."""
    for name in ("gpu1", "gpu2"):
        fleet_hosts[name].import_image(busybox_tar, IMAGE)
    return IMAGE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The hosts are shared by the whole session: their own checks (test_hosts.py, which expect fresh hosts: no mesh
    interface, no container network) run before the deploy tests change them; test_deploy.py (which starts with a
    fleet not yet deployed) before the modules that use the deployed fleet."""
    order = {"test_hosts.py": 0, "test_deploy.py": 1}  # then the other modules, on the deployed fleet
    items.sort(key=lambda item: order.get(item.path.name, 2) if "multihost" in item.path.parts else -1)


@dataclass
class LaptopImages:
    """The images built once per session in the laptop's own podman store: the project's own (saved: deploy ships
    them with ``--image``) and the third-party stand-ins (tests/images.py), which each host loads into its store
    as a real host would pull them."""

    store: tuple[list[str], dict[str, str]]  # the store's podman argv prefix and environment
    own: dict[str, Path]  # tag -> archive (`podman save`)
    third: dict[str, str]  # tag -> image id
    seconds: float  # how long building (or finding) them took

    def save(self, path: Path, tags: list[str]) -> Path:
        """``tags`` (any of this store's images) in one archive for ``podman load``."""
        podman(self.store, "save", "-m", "-o", str(path), *sorted(tags))
        return path


@pytest.fixture(scope="session")
def laptop_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaptopImages]:
    folder = tmp_path_factory.mktemp("images")
    store_dir = Path(tempfile.mkdtemp(prefix="fmh-", dir="/tmp"))  # short: podman's runroot is at most 50 characters
    store = podman_store(store_dir)
    images = Images()
    began = time.monotonic()
    try:
        own = build_fleet_images(store[0], store[1], images)
        third = build_stand_ins(store[0], store[1], images)
        archives = {}
        for tag in own:
            archives[tag] = folder / f"{tag.rsplit('/', 1)[-1].replace(':', '-')}.tar"
            podman(store, "save", "-o", str(archives[tag]), tag)
        yield LaptopImages(store, archives, third, time.monotonic() - began)
    finally:
        podman(store, "system", "reset", "--force")
        shutil.rmtree(store_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet(fleet_hosts: Hosts, laptop_images: LaptopImages, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    folder = tmp_path_factory.mktemp("fleet")
    spec = write_fleet(folder, fleet_hosts)
    began = time.monotonic()
    # The third-party images, as a real host would pull them: into every host's own store.
    bundle = laptop_images.save(folder / "third-party.tar", list(laptop_images.third))
    for host in fleet_hosts:
        host.run(f"podman load -i {bundle}", timeout=300)
    took = laptop_images.seconds + time.monotonic() - began
    print(f"images built and loaded in {took:.1f}s")
    return Fleet(fleet_hosts, folder, spec, folder / "state", laptop_images.own, laptop_images.store)


@pytest.fixture(scope="session")
def deployed(fleet: Fleet) -> Deploy:
    """The fleet, deployed once for the session (by the first test that needs it)."""
    result = fleet.deploy("--yes")
    assert result.rc == 0, f"{result.stderr[-3000:]}\n{json.dumps(result.out, indent=1)[-3000:]}"
    return result
