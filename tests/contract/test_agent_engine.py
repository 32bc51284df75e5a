"""The agent's container lookup (EngineNames, through the `docker` SDK) against a real podman API service.

A GPU host that runs its workers under podman serves the agent podman's Docker-compatible API; Docker's
engine serves the same API (none runs here). The service runs on a private socket and store
(tests/podman_service.py); its containers are created, never started: a lookup by id needs no more.
"""

from __future__ import annotations

import gc
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent import service
from controller.agent.service import EngineNames, ProcessOwners, ProcFs, engine_socket
from tests.conftest import need_tool
from tests.podman_service import PodmanService, running_podman

pytestmark = pytest.mark.contract
WORKER = "small-gpuhost-gpu0"
UNKNOWN = "01" * 32  # a well-formed id no engine knows


@pytest.fixture(scope="module")
def podman() -> Iterator[PodmanService]:
    with running_podman(need_tool("podman", "install Debian's podman and runc")) as running:
        yield running


@pytest.fixture(scope="module")
def container(podman: PodmanService) -> str:
    """The full id of a container named as the plan names a worker's."""
    return podman.create(f"fleet-{WORKER}")


@pytest.fixture
def names(podman: PodmanService) -> Iterator[EngineNames]:
    looked_up = EngineNames(podman.socket)
    yield looked_up
    looked_up.close()


def test_a_containers_full_id_resolves_to_its_name(names: EngineNames, container: str) -> None:
    assert len(container) == 64
    assert names(container) == f"fleet-{WORKER}"
    assert names(container) == f"fleet-{WORKER}"  # from the cache: a name never changes for an id
    assert names(UNKNOWN) is None  # the engine's 404 (docker.errors.NotFound)
    assert names(container) == f"fleet-{WORKER}"  # a miss leaves the client usable


def test_the_agent_maps_a_container_process_to_its_worker(names: EngineNames, container: str, tmp_path: Path) -> None:
    """The whole path: a GPU process's cgroup names a container id, the engine names the container."""
    cgroups = {
        4201: f"12:memory:/libpod_parent/libpod-{container}\n11:cpu:/libpod_parent/libpod-{container}\n",  # cgroupfs
        4202: f"0::/machine.slice/libpod-{UNKNOWN}.scope\n",  # a container this engine does not know
    }
    for pid, text in cgroups.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    owners = ProcessOwners([WORKER, "other-worker"], None, names, ProcFs(tmp_path))
    assert owners.owners(cgroups) == {4201: WORKER, 4202: None}


def test_the_socket_is_found_through_docker_host(
    podman: PodmanService, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{podman.socket}")
    assert engine_socket() == podman.socket
    found = EngineNames()  # no socket given: $DOCKER_HOST, else Docker's or podman's usual place
    try:
        assert found(container) == f"fleet-{WORKER}"
    finally:
        found.close()


# The connected client's one refused connect when its engine dies: docker 7.1.0 leaves that socket to the
# garbage collector (docker/docker-py#3356; EngineNames spares every later lookup the same, see `listening`).
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_dead_engine_is_none_quickly_and_asked_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that dies leaves a socket file that refuses connections; a miss then is asked again after
    NAME_MISS_TTL_S, through a new client once the engine is back."""
    with running_podman(need_tool("podman", "install Debian's podman and runc")) as engine:
        ids = {name: engine.create(f"fleet-{name}") for name in ("up", "remembered", "retried")}
        names = EngineNames(engine.socket)
        try:
            assert names(ids["up"]) == "fleet-up"  # a client is connected
            engine.kill()
            assert engine.socket.is_socket()
            began = time.monotonic()
            assert names(ids["remembered"]) is None
            monkeypatch.setattr(service, "NAME_MISS_TTL_S", 0.0)  # this miss is asked again at once
            assert names(ids["retried"]) is None
            assert time.monotonic() - began < 1  # refused at once: no waiting for a timeout
            assert names(ids["up"]) == "fleet-up"  # a name found is kept
            engine.start()
            assert names(ids["remembered"]) is None  # still within its NAME_MISS_TTL_S
            assert names(ids["retried"]) == "fleet-retried"
        finally:
            names.close()
            gc.collect()  # that socket goes now, while this test's warning filter holds


def test_an_engine_that_never_answers_is_none_within_the_timeout() -> None:
    folder = Path(tempfile.mkdtemp(prefix="fleet-engine-"))  # short: Unix socket paths are limited to 108 bytes
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(folder / "hung.sock"))
    hung.listen(8)  # connections wait in the backlog; nothing ever reads or answers them
    names = EngineNames(folder / "hung.sock", timeout_s=0.3)
    try:
        began = time.monotonic()
        assert names(UNKNOWN) is None
        assert time.monotonic() - began < 2
        assert EngineNames(folder / "absent.sock")(UNKNOWN) is None  # no socket at all
    finally:
        names.close()
        hung.close()
        (folder / "hung.sock").unlink()
        folder.rmdir()
