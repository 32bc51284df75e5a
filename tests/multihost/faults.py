"""Faults on the deployed fake fleet, and what the gateway and its clients see of them.

- `cut` / `link_cut`: a host's link cut as a real one is, a blackhole: the root namespace's end of its veth
  (`Host.veth`, its only link to the bridge the other hosts and the laptop are on) goes down. Frames to it are
  dropped without a word (no RST, no ICMP reaches the mesh: WireGuard carries the mesh over UDP on that link), so
  every TCP connection to the host over the mesh just stops getting answers. Restored by setting it up again; nothing
  on the host is touched (its workers keep running, as on a host whose switch port died).
- `EnvoyWatch`: the gateway Envoy's own view of its endpoints (admin ``/clusters?format=json`` on the gateway's
  loopback, polled from a small process in the gateway's network namespace every 0.1 s), each change timestamped
  with this machine's monotonic clock (the namespaces share it), so "out of rotation N s after the cut" is read off
  Envoy, not guessed from client errors.
- `Load`: a steady client load through the gateway's HTTPS address with the official SDK (no SDK retries: every
  failure the gateway lets through is counted).
- `measure_link_cut`: the whole scenario, for the test (tests/multihost/test_faults.py, which asserts) and the
  benchmark (bench/deploy.py, which reports).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from controller.plan import make_plan
from controller.plan.models import Worker
from controller.render import envoy
from controller.spec import load_spec
from tests.multihost.fleet import Fleet, gateway_client
from tests.multihost.hosts import Host

POLL_S = 0.1
# Runs in the gateway's netns (the machine's Python, standard library only): one JSON line per change of the
# endpoints' health flags ({"t": monotonic, "state": {"<cluster>/<address>:<port>": [flags]}}), or per new error.
_POLLER = r"""
import json, sys, time, urllib.request
port, clusters, every = int(sys.argv[1]), set(sys.argv[2].split(",")), float(sys.argv[3])
url = f"http://127.0.0.1:{port}/clusters?format=json"
last = None
while True:
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            doc = json.load(reply)
        now = {}
        for c in doc.get("cluster_statuses", []):
            if c.get("name") not in clusters:
                continue
            for h in c.get("host_statuses", []):
                sa = h.get("address", {}).get("socket_address", {})
                hs = h.get("health_status", {})
                flags = sorted(k for k, v in hs.items() if v is True)
                if hs.get("eds_health_status", "HEALTHY") != "HEALTHY":
                    flags.append("eds_" + hs["eds_health_status"])
                now[f"{c['name']}/{sa.get('address')}:{sa.get('port_value')}"] = flags
        line = {"t": t, "state": now}
    except Exception as exc:
        now = repr(exc)
        line = {"t": t, "error": now}
    if now != last:
        print(json.dumps(line), flush=True)
        last = now
    time.sleep(every)
"""


def gateway_ca(fleet: Fleet) -> Path:
    """The gateway's CA certificate (Caddy's internal CA), written next to the spec."""
    gw = fleet.hosts["gateway"]
    mount = gw.run("podman volume inspect fleet-caddy-data --format '{{.Mountpoint}}'").stdout.strip()
    path = fleet.folder / "gateway-ca.pem"
    path.write_text(gw.run(f"cat {mount}/caddy/pki/authorities/local/root.crt").stdout)
    return path


def api_key(fleet: Fleet, user: str) -> str:
    out = (
        fleet.hosts["gateway"]
        .run(
            "podman exec fleet-gatekeeper controller keys create --user "
            f"{user} --spec /etc/fleet/spec/fleet.yaml --state-dir /var/lib/fleet --json"
        )
        .stdout
    )
    key: str = json.loads(out)["key"]
    return key


def sdk(fleet: Fleet, key: str, ca: Path, timeout: float = 60) -> openai.OpenAI:
    """The official SDK on the gateway's HTTPS address, without the SDK's own retries."""
    gw = fleet.hosts["gateway"].address
    return openai.OpenAI(
        base_url=f"https://{gw}/v1", api_key=key, http_client=gateway_client(gw, ca), max_retries=0, timeout=timeout
    )


def worker(fleet: Fleet, model: str, host: str) -> Worker:
    """``model``'s replica on ``host`` in the plan of `fleet.spec`."""
    (found,) = [w for w in make_plan(load_spec(fleet.spec)).workers if w.model == model and w.host == host]
    return found


def endpoint_key(fleet: Fleet, model: str, host: str, cluster: str | None = None) -> str:
    """``<cluster>/<address>:<port>`` of ``model``'s replica on ``host`` in ``cluster`` (default: the model's), as
    `EnvoyWatch` names it."""
    w = worker(fleet, model, host)
    return f"{cluster or envoy.model_cluster(model)}/{w.address}:{w.port}"


def admin_port(fleet: Fleet) -> int:
    return make_plan(load_spec(fleet.spec)).fleet.gateway.ports.envoy_admin


def admin_get(gateway: Host, port: int, path: str) -> Any:
    """GET ``path`` on the gateway Envoy's admin (loopback of the gateway host), parsed as JSON."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    )
    return json.loads(gateway.exec(["python3", "-c", code, f"http://127.0.0.1:{port}{path}"]).stdout)


def _seconds(value: Any) -> float:
    return float(str(value).removesuffix("s")) if value is not None else 0.0


def _find_cluster(doc: Any, name: str) -> dict[str, Any] | None:
    if isinstance(doc, dict):
        if doc.get("name") == name and "health_checks" in doc:
            return doc
        items: Any = doc.values()
    elif isinstance(doc, list):
        items = doc
    else:
        return None
    for item in items:
        if (found := _find_cluster(item, name)) is not None:
            return found
    return None


@dataclass(frozen=True)
class HealthWindow:
    """The longest a replica that stops answering stays in rotation, from the active health check Envoy runs."""

    interval_s: float
    jitter_s: float
    timeout_s: float
    unhealthy_edge_interval_s: float
    unhealthy_threshold: int

    @property
    def bound_s(self) -> float:
        """The check after the cut starts at most interval + jitter later and fails timeout after; each further one
        (up to the threshold) follows unhealthy_edge_interval + jitter after a failure (Envoy's
        HealthCheckerImplBase::interval: a failure that has not yet changed the host's state uses the edge
        interval, which defaults to unhealthy_interval)."""
        first = self.interval_s + self.jitter_s + self.timeout_s
        return first + (self.unhealthy_threshold - 1) * (
            self.unhealthy_edge_interval_s + self.jitter_s + self.timeout_s
        )

    def describe(self) -> str:
        return (
            f"interval {self.interval_s:g} s + jitter {self.jitter_s:g} s + timeout {self.timeout_s:g} s, then "
            f"{self.unhealthy_threshold - 1} × (unhealthy interval {self.unhealthy_edge_interval_s:g} s + jitter "
            f"{self.jitter_s:g} s + timeout {self.timeout_s:g} s) = {self.bound_s:g} s"
        )


def health_window(gateway: Host, port: int, cluster: str) -> HealthWindow:
    """`HealthWindow` of ``cluster`` as the running Envoy has it (its config dump, not the renderer's output)."""
    found = _find_cluster(admin_get(gateway, port, "/config_dump"), cluster)
    assert found is not None, f"cluster {cluster} not in Envoy's config dump"
    (hc,) = found["health_checks"]
    assert not hc.get("interval_jitter_percent"), hc
    interval = _seconds(hc["interval"])
    unhealthy = _seconds(hc.get("unhealthy_interval", hc["interval"]))
    return HealthWindow(
        interval_s=interval,
        jitter_s=_seconds(hc.get("interval_jitter")),
        timeout_s=_seconds(hc["timeout"]),
        unhealthy_edge_interval_s=_seconds(hc.get("unhealthy_edge_interval", unhealthy)),
        unhealthy_threshold=int(hc["unhealthy_threshold"]),
    )


class EnvoyWatch:
    """The gateway Envoy's endpoint health flags over time (see the module docstring); a context manager."""

    def __init__(self, gateway: Host, port: int, clusters: list[str]) -> None:
        argv = ["nsenter", f"--net=/run/netns/{gateway.netns}", "--", "/usr/bin/python3", "-u", "-c", _POLLER]
        self.process = subprocess.Popen(
            [*argv, str(port), ",".join(clusters), str(POLL_S)], stdout=subprocess.PIPE, text=True
        )
        self.events: list[tuple[float, dict[str, list[str]]]] = []
        self.errors: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            item = json.loads(line)
            with self._changed:
                if "state" in item:
                    self.events.append((item["t"], item["state"]))
                else:
                    self.errors.append(item["error"])
                self._changed.notify_all()

    def flags(self, endpoint: str) -> list[str] | None:
        """The endpoint's flags now (None: not known to Envoy)."""
        with self._changed:
            return self.events[-1][1].get(endpoint) if self.events else None

    def wait(self, endpoint: str, want: Callable[[list[str]], bool], after: float, timeout: float) -> float | None:
        """The first time at or after ``after`` at which the endpoint's flags satisfy ``want``; None if that has
        not happened within ``timeout`` of ``after``."""
        deadline = after + timeout
        with self._changed:
            while True:
                current: list[str] | None = None
                for t, state in self.events:
                    flags = state.get(endpoint)
                    if t <= after:
                        current = flags
                        continue
                    if flags is not None and want(flags):
                        return t
                if current is not None and want(current):
                    return after
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.5))

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> EnvoyWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def out_of_rotation(flags: list[str]) -> bool:
    return bool(flags)


def failed_health_check(flags: list[str]) -> bool:
    return "failed_active_health_check" in flags


def in_rotation(flags: list[str]) -> bool:
    return not flags


@dataclass
class Answer:
    began: float
    seconds: float
    error: str | None


class Load:
    """``clients`` threads, each with its own SDK client, sending short chat completions (``max_tokens`` 4) to
    ``model`` one after the other until `stop`; every answer is recorded (`answers`)."""

    def __init__(self, make_client: Callable[[], openai.OpenAI], clients: int, model: str = "tiny-chat") -> None:
        self.model = model
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = [make_client() for _ in range(clients)]
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in self._clients]

    def _run(self, client: openai.OpenAI) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            error = None
            try:
                reply = client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                if not reply.choices:
                    error = "an answer without choices"
            except Exception as exc:  # every failure is counted, none hidden
                error = repr(exc)
            with self._lock:
                self.answers.append(Answer(began, time.monotonic() - began, error))

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        for c in self._clients:
            c.close()

    def errors(self) -> list[str]:
        with self._lock:
            return [a.error for a in self.answers if a.error]

    def between(self, start: float, end: float) -> list[Answer]:
        """Answers to the requests sent in [start, end)."""
        with self._lock:
            return [a for a in self.answers if start <= a.began < end]


def keepalive(gateway: Host, port: int, cluster: str) -> dict[str, int]:
    """``cluster``'s upstream TCP keepalive as the running Envoy has it (keepalive_time, _interval, _probes)."""
    found = _find_cluster(admin_get(gateway, port, "/config_dump"), cluster)
    assert found is not None, f"cluster {cluster} not in Envoy's config dump"
    ka = found.get("upstream_connection_options", {}).get("tcp_keepalive", {})
    return {k: int(v) for k, v in ka.items()}


def host_stat(gateway: Host, port: int, endpoint: str, stat: str) -> int:
    """An endpoint's stat (``rq_total``, ``rq_active``, ...) in Envoy's admin ``/clusters``."""
    cluster, address = endpoint.split("/", 1)
    doc = admin_get(gateway, port, "/clusters?format=json")
    for c in doc.get("cluster_statuses", []):
        if c.get("name") != cluster:
            continue
        for h in c.get("host_statuses", []):
            sa = h.get("address", {}).get("socket_address", {})
            if f"{sa.get('address')}:{sa.get('port_value')}" == address:
                return sum(int(s.get("value", 0)) for s in h.get("stats", []) if s.get("name") == stat)
    raise AssertionError(f"{endpoint} not in Envoy's clusters")


@contextmanager
def paused(host: Host, worker: str) -> Iterator[int]:
    """The worker's server stopped (SIGSTOP) inside the ``with``, continued after it, whatever happens: a backend
    busy with a long generation, as the network sees it (its kernel still accepts and acknowledges everything)."""
    containers = json.loads(host.exec(["podman", "ps", "--format", "json"]).stdout)
    (pid,) = [
        c["Pid"]
        for c in containers
        if c.get("Labels", {}).get("io.fleet.worker") == worker or worker in c.get("Names", [""])[0]
    ]
    host.exec(["kill", "-STOP", str(pid)])
    try:
        yield pid
    finally:
        host.exec(["kill", "-CONT", str(pid)], check=False)


def cut(host: Host) -> None:
    """Blackhole ``host``: its link (the root namespace's end of its veth) goes down."""
    subprocess.run(["ip", "link", "set", host.veth, "down"], check=True, capture_output=True, timeout=30)


def restore(host: Host) -> None:
    subprocess.run(["ip", "link", "set", host.veth, "up"], check=True, capture_output=True, timeout=30)


@contextmanager
def link_cut(host: Host) -> Iterator[float]:
    """The host's link down inside the ``with`` (its monotonic start time is the value), up again after it, whatever
    happens inside."""
    began = time.monotonic()
    cut(host)
    try:
        yield began
    finally:
        restore(host)


@dataclass
class LinkCut:
    """What `measure_link_cut` saw, in seconds from the cut (``back_*``: from the link's restoration)."""

    host: str
    window: HealthWindow
    chat_out_of_rotation_s: float | None = None  # first health flag of any kind (outlier detection or health check)
    chat_failed_health_check_s: float | None = None
    embed_out_of_rotation_s: float | None = None
    embed_503: list[tuple[int | None, float]] = field(default_factory=list)  # (status, seconds) while cut
    embed_codes: list[str | None] = field(default_factory=list)  # the OpenAI-shaped error's code of each
    cut_s: float = 0.0  # how long the link was down
    back_chat_s: float | None = None
    back_embed_s: float | None = None
    embed_after: str | None = None  # None: an embedding was served after the restoration, else why not
    served_by_host_after: int = 0  # chat requests the host's replica answered after it came back
    requests_during_cut: int = 0
    errors: list[str] = field(default_factory=list)  # chat load, whole run
    errors_in_window: int = 0  # of them, sent between the cut and the replica leaving rotation
    latency_s: dict[str, float] = field(default_factory=dict)  # chat load during the cut: p50, max

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "window"}
        out["health_window_s"] = self.window.bound_s
        out["errors"] = self.errors[:5]
        out["error_count"] = len(self.errors)
        return out


def measure_link_cut(
    fleet: Fleet,
    host: str = "gpu1",
    *,
    clients: int = 4,
    hold_s: float = 20.0,
    timeout_s: float = 60.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> LinkCut:
    """Cut ``host``'s link under a steady chat load (``clients`` at once) and watch the gateway: when the host's
    tiny-chat and tiny-embed endpoints leave rotation, how tiny-embed (no replica elsewhere) answers meanwhile, and,
    once the link is back (after at least ``hold_s``: every request in flight at the cut has met its kernel timeout
    by then), when both are back in rotation and serving. Nothing is deployed. Waits are bounded by ``timeout_s``."""
    gateway = fleet.hosts["gateway"]
    target = fleet.hosts[host]
    port = admin_port(fleet)
    chat = endpoint_key(fleet, "tiny-chat", host)
    embed = endpoint_key(fleet, "tiny-embed", host)
    ca = gateway_ca(fleet)
    key = api_key(fleet, "alice")
    probe = sdk(fleet, key, ca, timeout=30)
    result = LinkCut(host=host, window=health_window(gateway, port, chat.split("/")[0]))
    with EnvoyWatch(gateway, port, [chat.split("/")[0], embed.split("/")[0]]) as watch:
        wait_serving(
            watch, probe, [chat, embed], 180, gateway
        )  # a deploy just before: its listener may wait for the TLS secret
        load = Load(lambda: sdk(fleet, key, ca), clients).start()
        try:
            time.sleep(3)  # the load's connections are open and pooled (Envoy's too) before the cut
            assert not load.errors(), f"errors before the cut: {load.errors()[:5]}"
            with link_cut(target) as began:
                log(f"[faults] {host}: link cut")
                out = watch.wait(chat, out_of_rotation, began, timeout_s)
                hc = watch.wait(chat, failed_health_check, began, timeout_s)
                emb = watch.wait(embed, out_of_rotation, began, timeout_s)
                result.chat_out_of_rotation_s = None if out is None else out - began
                result.chat_failed_health_check_s = None if hc is None else hc - began
                result.embed_out_of_rotation_s = None if emb is None else emb - began
                log(
                    f"[faults] out of rotation: tiny-chat {result.chat_out_of_rotation_s}, embed {result.embed_out_of_rotation_s}"
                )
                if emb is not None:
                    for _ in range(3):
                        t0 = time.monotonic()
                        status: int | None = None
                        code: str | None = None
                        try:
                            probe.embeddings.create(model="tiny-embed", input="hello")
                            status = 200
                        except openai.APIStatusError as exc:
                            status, code = exc.status_code, exc.code
                        except openai.APIError as exc:
                            code = repr(exc)
                        result.embed_503.append((status, round(time.monotonic() - t0, 3)))
                        result.embed_codes.append(code)
                time.sleep(max(0.0, began + hold_s - time.monotonic()))
                ended = time.monotonic()
            result.cut_s = ended - began
            log(f"[faults] {host}: link restored after {result.cut_s:.1f} s")
            back_chat = watch.wait(chat, in_rotation, ended, timeout_s)
            back_embed = watch.wait(embed, in_rotation, ended, timeout_s)
            result.back_chat_s = None if back_chat is None else back_chat - ended
            result.back_embed_s = None if back_embed is None else back_embed - ended
            if back_embed is not None:
                try:
                    probe.embeddings.create(model="tiny-embed", input="hello")
                except openai.APIError as exc:
                    result.embed_after = repr(exc)
            else:
                result.embed_after = "the endpoint did not come back"
            if back_chat is not None:
                before = host_stat(gateway, port, chat, "rq_total")
                time.sleep(4)  # the load reaches the replica again
                result.served_by_host_after = host_stat(gateway, port, chat, "rq_total") - before
        finally:
            load.stop()
            probe.close()
    result.errors = load.errors()
    during = load.between(began, ended)
    result.requests_during_cut = len(during)
    if during:
        result.latency_s = {
            "p50": round(statistics.median(a.seconds for a in during), 3),
            "max": round(max(a.seconds for a in during), 3),
        }
    until = began + (result.chat_out_of_rotation_s or result.cut_s)
    result.errors_in_window = sum(1 for a in load.between(began, until) if a.error)
    return result


def wait_serving(
    watch: EnvoyWatch, client: openai.OpenAI, endpoints: list[str], timeout: float, gateway: Host | None = None
) -> None:
    """Every endpoint in rotation and both models answering through the model routes (a deploy or a fault just
    before may still be settling); on failure, what the gateway runs and listens on (``gateway``)."""
    now = time.monotonic()
    for endpoint in endpoints:
        assert watch.wait(endpoint, in_rotation, now, timeout) is not None, (
            f"{endpoint} not in rotation: {watch.flags(endpoint)} {watch.errors[-3:]}"
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            client.embeddings.create(model="tiny-embed", input="hello")
            return
        except openai.APIError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the gateway does not serve: {exc!r}\n{diagnose(gateway)}") from exc
            time.sleep(1)


def diagnose(gateway: Host | None) -> str:
    """The gateway's containers, listening sockets and Envoy's last log lines, for a failure message."""
    if gateway is None:
        return ""
    out = []
    for argv in (
        ["podman", "ps", "-a", "--format", "{{.Names}} {{.Status}}"],
        ["ss", "-ltn"],
        ["sh", "-c", "podman logs --tail 30 $(podman ps -a --format '{{.Names}}' | grep envoy | head -1) 2>&1"],
    ):
        done = gateway.exec(argv, check=False)
        out.append(f"$ {' '.join(argv)}\n{done.stdout[-3000:]}{done.stderr[-1000:]}")
    return "\n".join(out)
