"""How the swap coordinator loads and unloads a worker, per backend and per place.

- llama.cpp: a single-model llama-server cannot unload, so its worker process (or container) is started to load
  and stopped to unload; loaded means its `/health` answers 200 (503 while it loads the weights).
- vLLM: started at its first load (not before: a vLLM takes its whole `--gpu-memory-utilization` share when it
  starts), then sleep mode: `POST /sleep?level=1` (weights to CPU memory, KV cache dropped) to unload, `POST
  /wake_up` to load, so a later load costs a copy back, not a start. The coordinator drains it first: vLLM
  aborts what is in flight when it sleeps, and its engine dies serving a request while asleep. With
  `swap.unload: stop` it is started and stopped as llama.cpp is (no sleep residue left on the GPU).
- Ollama: `/api/generate` with `keep_alive: -1` to load and `0` to unload (the worker's server keeps running).

`LocalMover` does it on this machine through the stack's supervisor (`controller up`); `AgentMover` asks each
GPU host's agent (`POST /v1/workers/<name>/load|unload` with the worker secret), which does the same there.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from controller import backends
from controller.backends import client as worker_client
from controller.backends.client import WorkerClient
from controller.errors import BackendError, ControllerError
from controller.local import stack
from controller.local.processes import url_host
from controller.local.state import StateDir
from controller.plan.models import Plan, Worker
from controller.spec.models import Model

ROW_POLL_S = 0.5  # how often a load asks the supervisor whether the starting worker is still there
HEALTH_POLL_S = 0.02  # how often a starting worker is asked whether it has loaded: the swap waits no longer than this


class LocalMover:
    """Workers of a `controller up` stack: processes of its supervisor."""

    def __init__(self, state: StateDir, key: str, plan: Plan) -> None:
        self.state = state
        self.key = key
        self.plan = plan

    def _url(self, worker: Worker) -> str:
        return f"http://{url_host(worker.address)}:{worker.port}"

    def _row(self, worker: Worker) -> dict[str, object]:
        reply = stack.request(self.state, "status")
        row = (reply.get("processes") or {}).get(worker.name)
        if row is None:
            raise ControllerError(f"the supervisor has no process {worker.name}")
        return dict(row)

    async def _start(self, worker: Worker, model: Model) -> None:
        """Start the worker's process and wait until it answers its health check (it has loaded its model); an
        Ollama or vLLM worker then answers to the model's names (an Ollama worker pulls and names it first)."""
        row = await asyncio.to_thread(self._row, worker)
        restarts = row.get("restarts")
        await asyncio.to_thread(stack.request, self.state, "start", worker.name)
        deadline = time.monotonic() + worker_client.LOAD_TIMEOUT_S
        health = backends.get(worker.backend).health_path
        next_row = time.monotonic() + ROW_POLL_S
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                try:
                    if (await http.get(self._url(worker) + health)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= next_row:  # the supervisor's word on it, now and then: it exited?
                    next_row = time.monotonic() + ROW_POLL_S
                    row = await asyncio.to_thread(self._row, worker)
                if row.get("restarts") != restarts or row.get("state") == "backoff":
                    raise BackendError(
                        f"{worker.name} exited while loading (exit {row.get('last_exit')}); see "
                        f"`controller logs {worker.name}`"
                    )
                if time.monotonic() > deadline:
                    raise BackendError(f"{worker.name} did not load in {worker_client.LOAD_TIMEOUT_S:.0f}s")
                await asyncio.sleep(HEALTH_POLL_S)
        if worker.backend != "llamacpp":
            await asyncio.to_thread(self._client_call, worker, model, "ensure_model")

    async def load(self, worker: Worker, model: Model) -> None:
        row = await asyncio.to_thread(self._row, worker)
        running = not row.get("held") and row.get("pid") is not None
        restarts = backends.unloads_by_stopping(model)
        if restarts or not running:
            await self._start(worker, model)
            if restarts:
                return
        await asyncio.to_thread(self._client_call, worker, model, "load")

    async def unload(self, worker: Worker, model: Model) -> None:
        if backends.unloads_by_stopping(model):
            await asyncio.to_thread(stack.request, self.state, "stop", worker.name)
            return
        row = await asyncio.to_thread(self._row, worker)
        if row.get("held") or row.get("pid") is None:
            return  # never started: it holds nothing
        await asyncio.to_thread(self._client_call, worker, model, "unload")

    async def resident(self, worker: Worker, model: Model) -> bool:
        """Whether it holds its model now. The worker itself is asked, not the supervisor's health column, which
        lags a start by up to its probe interval (a model loaded a moment ago would read as not loaded); a worker
        that does not answer raises: nothing is learned from it."""
        row = await asyncio.to_thread(self._row, worker)
        if row.get("held") or row.get("pid") is None:
            return False
        if backends.unloads_by_stopping(model):
            health = backends.get(worker.backend).health_path
            async with httpx.AsyncClient(timeout=5.0) as http:
                return (await http.get(self._url(worker) + health)).status_code == 200
        return bool(await asyncio.to_thread(self._client_call, worker, model, "loaded"))

    async def gpu_unmanaged(self, worker: Worker) -> dict[str, float]:
        return await unmanaged_gib(self.plan, worker)

    def _client_call(self, worker: Worker, model: Model, action: str) -> object:
        with WorkerClient(worker.backend, self._url(worker), key=self.key) as client:
            return getattr(client, action)(model)


class AgentMover:
    """Workers of a deployed fleet: each GPU host's agent loads and unloads its own."""

    def __init__(self, plan: Plan, key: str) -> None:
        self.plan = plan
        self.http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {key}"}, timeout=worker_client.LOAD_TIMEOUT_S + 30
        )

    def _url(self, worker: Worker, action: str) -> str:
        host = self.plan.host(worker.host)
        return f"http://{url_host(str(host.address))}:{host.agent_port}/v1/workers/{worker.name}/{action}"

    async def _call(self, method: str, worker: Worker, action: str) -> dict[str, object]:
        try:
            response = await self.http.request(method, self._url(worker, action))
        except httpx.HTTPError as exc:
            raise BackendError(
                f"the agent of host {worker.host} did not answer ({action} {worker.name}): {exc}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            detail = body.get("detail") if isinstance(body, dict) else None
            raise BackendError(
                f"the agent of host {worker.host}: {action} {worker.name} answered {response.status_code}: "
                f"{detail or response.text[:300]}"
            )
        return body if isinstance(body, dict) else {}

    async def load(self, worker: Worker, model: Model) -> None:
        await self._call("POST", worker, "load")

    async def unload(self, worker: Worker, model: Model) -> None:
        await self._call("POST", worker, "unload")

    async def resident(self, worker: Worker, model: Model) -> bool:
        return (await self._call("GET", worker, "residency")).get("state") == "resident"

    async def gpu_unmanaged(self, worker: Worker) -> dict[str, float]:
        return await unmanaged_gib(self.plan, worker)


GIB = 1024**3


async def unmanaged_gib(plan: Plan, worker: Worker) -> dict[str, float]:
    """Per GPU of the worker: GiB held by processes the host agent finds owned by no worker of the fleet (its
    `/status`, from NVML); empty when the agent or NVML cannot tell."""
    host = plan.host(worker.host)
    url = f"http://{url_host(str(host.address))}:{host.agent_port}/status"
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:
            doc = (await http.get(url)).json()
    except (httpx.HTTPError, ValueError):
        return {}
    mine = {g.uuid for g in worker.gpus}
    out: dict[str, float] = {}
    for gpu in doc.get("gpus") or []:
        if gpu.get("uuid") in mine and gpu.get("processes") is not None:
            held = sum(int(p.get("memory_bytes") or 0) for p in gpu["processes"] if p.get("worker") is None)
            out[str(gpu["uuid"])] = held / GIB
    return out
