"""The guard in front of a worker that cannot keep out all but the gateway: a Caddy that lets only its requests in.

Two kinds of worker have one (`guarded`):
- Ollama has no authentication of its own, so its worker cannot refuse a
  request that did not come through the gateway;
- vLLM in development mode (an on-demand worker, whose model has `swap`: the
  swap coordinator puts it to sleep and wakes it up, controller/backends/vllm.py)
  checks its API key only under /v1, and development mode adds routes outside
  /v1 that anyone reaching the port could call: `/sleep`, `/wake_up`, and
  `/collective_rpc`, which runs any method of vLLM's workers.

Instead, the server listens on loopback only and a Caddy (the guard) answers
on the worker's planned address and port: it requires the worker secret
(controller/secrets.py) that Envoy adds to every request it sends a worker,
and passes the request on unbuffered; anything else is a 401 in the OpenAI
error shape, except the health route Envoy checks, which stays open as for the
other backends. For Ollama it strips the secret; vLLM gets it, and still
requires it under /v1 itself. Caddy reads the secret from its file when a
request arrives (the `{file.*}` placeholder), so the rendered Caddyfile names
only the file.

- In containers (Compose, Quadlet) the worker's container shares the guard
  container's network namespace and publishes no port: its loopback address
  is reachable only from inside that namespace, so only through the guard.
- On a workstation (`controller up`), as root, the worker runs in a network
  namespace of its own and the guard reaches it over a Unix socket of mode
  0600, bridged inside the namespace by a second Caddy
  (``caddy/worker-bridge.Caddyfile.j2``; see
  controller/local/processes.py, `in_own_network`). Without root both are
  plain processes and the worker's own loopback port is still reachable by any
  local user. Either way the guard holds the planned port, which Envoy and
  everything else in the stack uses.

One Jinja template (``caddy/worker-guard.Caddyfile.j2``, StrictUndefined)
serves both; containers mount `<host>/guard/<worker>.Caddyfile` from the
host's /etc/fleet.
"""

from __future__ import annotations

import re

from controller import backends
from controller.backends.ollama import Ollama
from controller.backends.vllm import VLLM
from controller.errors import RenderError
from controller.plan.models import Plan, Worker
from controller.render import Files, text_template

# Inside the shared network namespace of a containerized worker: the guard's port (published as the worker's
# planned address and port) and the server's own, on loopback (`container_upstream`; Ollama's is UPSTREAM).
GUARD_PORT = 8080
UPSTREAM = f"127.0.0.1:{Ollama.container_port}"
# The guard's own liveness (the supervisor and the container engine ask it), answered by Caddy itself: the
# worker's health route goes through to the server, and a guard whose server is stopped (`controller stop`) is
# still a healthy guard.
GUARD_HEALTH_PATH = "/fleet-guard/healthz"
# A path that goes into a Caddy placeholder and a quoted Caddyfile token: nothing that would end either.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@ -]*$")


def guarded(plan: Plan, worker: Worker) -> bool:
    """Whether the worker runs behind a guard: its server cannot keep out everyone but the gateway itself (Ollama;
    vLLM in development mode, its on-demand workers)."""
    if worker.backend == "ollama":
        return True
    return worker.backend == "vllm" and VLLM.dev_mode(plan.model(worker.model))


def container_upstream(worker: Worker) -> str:
    """The server's own address inside its guard's network namespace (containers): its port on loopback."""
    return f"127.0.0.1:{backends.get(worker.backend).container_port}"


def guard_name(worker: Worker) -> str:
    """The guard's name: its container's (`fleet-<name>`) and its process's in `controller status`."""
    return f"{worker.name}-guard"


def config_path(worker: Worker) -> str:
    """The guard's Caddyfile, relative to a host's rendered folder (and to /etc/fleet on the host)."""
    return f"guard/{worker.name}.Caddyfile"


def caddyfile(plan: Plan, worker: Worker, *, bind: str | None, port: int, upstream: str, key_file: str) -> str:
    """The guard's Caddyfile: listen on ``bind``:``port`` (all addresses without ``bind``), pass to ``upstream``,
    and let through only requests with the worker secret read from ``key_file`` at run time."""
    if not _SAFE_PATH.match(key_file):
        raise RenderError(
            f"worker secret path {key_file!r}: use an absolute path of letters, digits, spaces and ./_-+@ only"
        )
    return text_template("caddy", "worker-guard.Caddyfile.j2").render(
        worker=worker.name,
        backend=worker.backend,
        bind=bind,
        port=port,
        upstream=upstream,
        # The server's own loopback address as Host (Ollama refuses others); behind a Unix socket its bridge sets it.
        host_header="localhost" if upstream.startswith("unix/") else "{upstream_hostport}",
        key_file=key_file,
        health_path=backends.get(worker.backend).health_path,
        guard_health_path=GUARD_HEALTH_PATH,
        headers_timeout_s=plan.fleet.gateway.request_headers_timeout_s,
    )


def host_files(plan: Plan, host: str, key_file: str) -> Files:
    """The guards' Caddyfiles of ``host``'s containerized workers (``key_file``: the secret's path inside the
    guard container)."""
    return {
        f"{host}/{config_path(w)}": caddyfile(
            plan, w, bind=None, port=GUARD_PORT, upstream=container_upstream(w), key_file=key_file
        )
        for w in plan.workers_on(host)
        if guarded(plan, w)
    }


def bridge_config_path(worker: Worker) -> str:
    """The Caddyfile of the bridge inside a workstation guarded worker's own network namespace (controller up)."""
    return f"guard/{worker.name}.bridge.Caddyfile"


def bridge_caddyfile(worker: Worker, *, socket: str, upstream: str) -> str:
    """The bridge: inside the worker's network namespace, a Unix socket of mode 0600 passed on to its port."""
    if not _SAFE_PATH.match(socket):
        raise RenderError(f"socket path {socket!r}: use an absolute path of letters, digits, spaces and ./_-+@ only")
    return text_template("caddy", "worker-bridge.Caddyfile.j2").render(
        worker=worker.name, socket=socket, upstream=upstream
    )
