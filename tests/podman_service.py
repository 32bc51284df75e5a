"""A private podman API service for tests: `podman system service` on a socket in a folder of its own.

The service and the `podman` commands a test runs share a store of their own (``--root``, ``--runroot``,
``--tmpdir``, vfs storage) and a containers.conf with this machine's facts (runc, cgroupfs, no default
ulimits), so a test never touches the machine's images and containers and leaves nothing behind. No
registry is reachable here: `scratch_image` imports an empty root filesystem, enough for a container that
is created and never started.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONTAINERS_CONF = """\
[engine]
runtime = "runc"  # crun fails on this machine's cgroup layout
cgroup_manager = "cgroupfs"  # systemd is not PID 1 here
events_logger = "file"

[containers]
default_ulimits = []
"""
SCRATCH = "localhost/fleet-test-scratch:latest"
START_TIMEOUT_S = 20.0  # it answers in about 0.1 s here; a loaded 2-core machine may take far longer


class PodmanService:
    """One ``podman system service`` on ``folder/podman.sock``, and podman commands on the same store."""

    def __init__(self, podman: str, folder: Path) -> None:
        self.podman = podman
        self.folder = folder
        self.socket = folder / "podman.sock"  # keep ``folder`` short: Unix socket paths are limited to 108 bytes
        (folder / "containers.conf").write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(folder / "containers.conf")}
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        store = ["--root", str(self.folder / "root"), "--runroot", str(self.folder / "run")]
        return [self.podman, *store, "--tmpdir", str(self.folder / "tmp"), "--storage-driver", "vfs", *args]

    def run(self, *args: str, stdin: bytes | None = None) -> str:
        """A podman command on this service's store; its output, or an error with podman's own message."""
        result = subprocess.run(self.command(*args), env=self.env, input=stdin, capture_output=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr.decode()[-2000:]}")
        return result.stdout.decode().strip()

    def start(self) -> None:
        """Start the service (over a stale socket file too) and wait until it answers ``GET /_ping``."""
        log = self.folder / "service.log"
        with log.open("ab") as out:
            argv = self.command("system", "service", "--time=0", f"unix://{self.socket}")
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"podman system service exited with {self.proc.returncode}: {log.read_text()}")
            if self.answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"podman system service not answering after {START_TIMEOUT_S} s: {log.read_text()}")

    def answers(self) -> bool:
        """Whether ``GET /_ping`` is 200. Plain sockets: httpx (httpcore) leaks the socket of a refused Unix connect."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            try:
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
                return sock.recv(64).split(b"\r\n")[0].split(b" ")[1:2] == [b"200"]
            except OSError:
                return False

    def kill(self) -> None:
        """Kill the service as a crash would: its socket file stays behind, refusing connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def scratch_image(self) -> str:
        """An image with an empty root filesystem (imported from a tarball: no registry here), once."""
        if not self.run("images", "--quiet", SCRATCH):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                entry = tarfile.TarInfo("tmp")
                entry.type, entry.mode = tarfile.DIRTYPE, 0o1777
                tar.addfile(entry)
            self.run("import", "-", SCRATCH, stdin=buffer.getvalue())
        return SCRATCH

    def create(self, name: str) -> str:
        """A container named ``name``, created (never started); its full 64-hex id."""
        return self.run("create", "--name", name, "--network", "none", self.scratch_image(), "/absent")


@contextmanager
def running_podman(podman: str) -> Iterator[PodmanService]:
    """A started service on a store in a new folder under /tmp; stopped, and the folder removed, afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="fleet-podman-"))
    service = PodmanService(podman, folder)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        shutil.rmtree(folder, ignore_errors=True)
