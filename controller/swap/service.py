"""`fleet-swapper`: the swap coordinator's HTTP service, on the gateway host's loopback.

- `POST` on every inference route (controller/backends/apis.py): a request Envoy sent here because its
  on-demand model is not resident (the request has passed the gateway: identity, ACL, limits; the metering
  reads the answer on its way back through Envoy). It waits for the model's load, then goes to the worker with
  the worker secret and its answer streams back unbuffered. A streaming request gets its SSE headers at once
  and a comment line every COMMENT_S while it waits, so no client times out; if the load is refused after
  that, the stream carries one error event (which the SDKs raise) and ends. Otherwise a refusal is the HTTP
  status (429 or 503) with Retry-After. Errors take the OpenAI shape, Anthropic's on its Messages routes.
- `GET /resident/<worker>`: Envoy's health check of an on-demand worker: 200 while resident, else 503.
- `GET /swap/status`: the coordinator's state as JSON; `GET /metrics`: the same for Prometheus.
- `POST /swap/load/<model>`, `POST /swap/unload/<model>`: operator actions (the worker secret as bearer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.atomic import write_file
from controller.backends import apis
from controller.local.processes import url_host
from controller.local.state import StateDir
from controller.plan import Plan, Worker, make_plan
from controller.render import envoy
from controller.render.envoy import INFERENCE_PATHS, RESIDENT_PATH
from controller.secrets import read_worker_key
from controller.spec import load_spec
from controller.swap.coordinator import Coordinator, Mover, Refused, Slot
from controller.swap.movers import AgentMover, LocalMover

log = logging.getLogger("fleet.swap")

COMMENT_S = 2.0  # a waiting stream gets an SSE comment this often
TICK_S = 1.0
# Request headers passed on to the worker (the worker secret is added; the caller's credentials never reach here).
PASS_HEADERS = ("content-type", "accept")
# Response headers passed back (length and encoding are the stream's own).
PASS_BACK = ("content-type", "cache-control")


class EnvoyTraffic:
    """In-flight requests per cluster and hosts out of rotation, from Envoy's admin interface."""

    def __init__(self, admin_port: int, eds_dir: Path | None = None) -> None:
        self.base = f"http://127.0.0.1:{admin_port}"
        self.http = httpx.AsyncClient(timeout=2.0)
        self.eds_dir = eds_dir

    async def mark(self, clusters: list[str], worker: Worker, draining: bool) -> None:
        if self.eds_dir is not None:
            await asyncio.to_thread(mark_endpoints, self.eds_dir, clusters, worker, draining)

    async def active(self, clusters: list[str]) -> dict[str, int] | None:
        if not clusters:
            return {}
        names = "|".join(sorted(set(clusters)))
        try:
            response = await self.http.get(
                f"{self.base}/stats", params={"format": "json", "filter": rf"^cluster\.({names})\.upstream_rq_active$"}
            )
            stats = response.json().get("stats") or []
        except (httpx.HTTPError, ValueError):
            return None
        out: dict[str, int] = {}
        for stat in stats:
            name = str(stat.get("name", ""))
            if name.startswith("cluster.") and name.endswith(".upstream_rq_active"):
                out[name[len("cluster.") : -len(".upstream_rq_active")]] = int(stat.get("value") or 0)
        return out

    async def out_of_rotation(self, clusters: list[str]) -> bool | None:
        """No healthy host left in any of ``clusters``, by Envoy's `membership_healthy` gauges (one ask)."""
        names = "|".join(sorted(set(clusters)))
        try:
            response = await self.http.get(
                f"{self.base}/stats", params={"format": "json", "filter": rf"^cluster\.({names})\.membership_healthy$"}
            )
            stats = response.json().get("stats") or []
        except (httpx.HTTPError, ValueError):
            return None
        if len(stats) < len(set(clusters)):
            return None  # a cluster Envoy does not know (yet): nothing routed there
        return all(int(stat.get("value") or 0) == 0 for stat in stats)


def mark_endpoints(eds_dir: Path, clusters: list[str], worker: Worker, draining: bool) -> None:
    """Set or clear DRAINING on the worker's endpoint in each cluster's endpoint file (EDS, which Envoy watches),
    each file replaced by a rename. Whoever rewrites the files from the plan (deploy, `controller up`) clears the
    mark; Envoy's health check of the worker, which this service answers, still keeps an unloaded one out."""
    address = (url_host(worker.address).strip("[]"), worker.port)
    for cluster in clusters:
        path = eds_dir / f"{cluster}.yaml"
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if envoy.set_draining(doc, {address}, draining):
            write_file(path, envoy.dump(doc))


def error_body(message: str, status: int, code: str, anthropic: bool = False) -> dict[str, Any]:
    """An error in the OpenAI shape, or (``anthropic``: the request came on a Messages route) in Anthropic's."""
    if anthropic:
        return apis.anthropic_error(status, message)
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def refusal(exc: Refused, anthropic: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s is not None else {}
    body = error_body(exc.message, exc.status, exc.code, anthropic)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def sse_error(message: str, status: int, code: str, anthropic: bool = False) -> bytes:
    """One error event: OpenAI's (a `data:` line the OpenAI SDKs raise) or Anthropic's (`event: error`)."""
    data = b"data: " + json.dumps(error_body(message, status, code, anthropic), separators=(",", ":")).encode()
    return (b"event: error\n" if anthropic else b"") + data + b"\n\n"


class SwapMetrics(Collector):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterable[Any]:
        snap = self.coordinator.snapshot()
        state = GaugeMetricFamily(
            "fleet_swap_resident", "1 while the on-demand worker is resident", labels=["worker", "model"]
        )
        waiting = GaugeMetricFamily(
            "fleet_swap_waiting", "Requests held until the worker is resident", labels=["worker"]
        )
        loads = CounterMetricFamily("fleet_swap_loads", "Loads of the on-demand worker", labels=["worker"])
        evictions = CounterMetricFamily("fleet_swap_evictions", "Unloads of the on-demand worker", labels=["worker"])
        last = GaugeMetricFamily("fleet_swap_last_load_seconds", "The last load, by phase", labels=["worker", "phase"])
        refused = CounterMetricFamily("fleet_swap_refused", "Requests refused", labels=["worker", "reason"])
        for name, w in snap["workers"].items():
            state.add_metric([name, w["model"]], 1.0 if w["state"] == "resident" else 0.0)
            waiting.add_metric([name], float(w["waiting"]))
            loads.add_metric([name], float(w["loads"]))
            evictions.add_metric([name], float(w["evictions"]))
            for phase, seconds in (w["last_load"] or {}).items():
                last.add_metric([name, phase.removesuffix("_s")], float(seconds))
        for key, count in snap["refusals"].items():
            worker, reason = key.split(":", 1)
            refused.add_metric([worker, reason], float(count))
        yield from (state, waiting, loads, evictions, last, refused)


def create_app(plan: Plan, mover: Mover, traffic: EnvoyTraffic, key: str) -> FastAPI:
    coordinator = Coordinator(plan, mover, traffic)
    registry = CollectorRegistry()
    registry.register(SwapMetrics(coordinator))
    upstream = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), headers={"Authorization": f"Bearer {key}"})

    async def upkeep() -> None:
        await coordinator.start()
        while True:
            try:
                await coordinator.tick()
            except Exception:  # the loop must outlive any one failure; logged with its traceback
                log.exception("swap upkeep failed")
            await asyncio.sleep(TICK_S)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(upkeep())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await upstream.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.coordinator = coordinator

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get(RESIDENT_PATH + "{worker}")
    def resident(worker: str) -> Response:
        slot = coordinator.slots.get(worker)
        ok = slot is not None and slot.state == "resident"
        return Response(status_code=200 if ok else 503)

    @app.get("/swap/status")
    def status() -> dict[str, Any]:
        return coordinator.snapshot()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/swap/{action}/{name:path}")
    async def act(action: str, name: str, request: Request) -> Response:
        if not authorized(request):
            return JSONResponse(error_body("the worker secret is required", 401, "unauthorized"), status_code=401)
        try:
            if action == "load":
                slot = await coordinator.load(name)
            elif action == "unload":
                slot = await coordinator.unload(name)
            else:
                return JSONResponse(error_body(f"unknown action {action!r}", 404, "not_found"), status_code=404)
        except Refused as exc:
            return refusal(exc)
        return JSONResponse(coordinator.snapshot()["workers"][slot.worker.name])

    async def held(request: Request) -> Response:
        name = request.headers.get("x-fleet-model", "")
        slot = coordinator.slot_for(name)
        shape = request.url.path in apis.ANTHROPIC
        if slot is None:
            message = f"model {name!r} is not an on-demand model of this gateway"
            return JSONResponse(error_body(message, 404, "model_not_found", shape), status_code=404)
        user = request.headers.get("x-fleet-user")
        body = await request.body()
        try:
            streaming = bool(json.loads(body or b"{}").get("stream"))
        except (ValueError, AttributeError):
            streaming = False
        target = f"http://{url_host(slot.worker.address)}:{slot.worker.port}{request.url.path}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASS_HEADERS}
        if not streaming:
            try:
                await coordinator.acquire(slot, user)
            except Refused as exc:
                return refusal(exc, shape)
            return await forward(slot, target, headers, body, shape)
        return StreamingResponse(
            stream(slot, user, target, headers, body, shape),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def forward(slot: Slot, target: str, headers: dict[str, str], body: bytes, shape: bool) -> Response:
        """Send a request whose `acquire` succeeded on to the worker; its answer streams back, and the claim is
        given back once it has passed (or when sending failed)."""
        gate = coordinator.serving(slot)
        try:
            await gate.__aenter__()
            reply = await upstream.send(
                upstream.build_request("POST", target, headers=headers, content=body), stream=True
            )
        except BaseException as exc:
            await gate.__aexit__(None, None, None)
            if not isinstance(exc, httpx.HTTPError):
                raise
            message = f"model {slot.model.name}: its worker failed before answering: {exc}"
            return JSONResponse(error_body(message, 503, "upstream_failure", shape), status_code=503)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            finally:
                await reply.aclose()
                await gate.__aexit__(None, None, None)

        back = {k: v for k, v in reply.headers.items() if k.lower() in PASS_BACK}
        return StreamingResponse(relay(), status_code=reply.status_code, headers=back)

    async def stream(
        slot: Slot, user: str | None, target: str, headers: dict[str, str], body: bytes, shape: bool
    ) -> AsyncIterator[bytes]:
        waiter = asyncio.create_task(coordinator.acquire(slot, user))
        sent = False
        try:
            if not waiter.done():
                yield f": loading model {slot.model.name}\n\n".encode()
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=COMMENT_S)
                if done:
                    break
                yield f": loading model {slot.model.name} ({slot.state}; {slot.waiting} waiting)\n\n".encode()
            error = waiter.exception()
            if isinstance(error, Refused):
                yield sse_error(error.message, error.status, error.code, shape)
                return
            if error is not None:
                raise error
            sent = True
            async with coordinator.serving(slot):
                try:
                    async with upstream.stream("POST", target, headers=headers, content=body) as reply:
                        if reply.status_code >= 400:
                            text = (await reply.aread()).decode(errors="replace")[:2000]
                            yield sse_error(
                                f"model {slot.model.name} answered {reply.status_code}: {text}",
                                reply.status_code,
                                "upstream_error",
                                shape,
                            )
                            return
                        async for chunk in reply.aiter_raw():
                            yield chunk
                except httpx.HTTPError as exc:
                    yield sse_error(
                        f"model {slot.model.name}: its worker failed: {exc}", 503, "upstream_failure", shape
                    )
        finally:
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled() and waiter.exception() is None and not sent:
                coordinator.release(slot)  # the client left between the load and the sending

    for path in INFERENCE_PATHS:
        app.add_api_route(path, held, methods=["POST"])
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="fleet-swapper", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--secrets-dir", type=Path, required=True, help="holds the worker secret (worker.key)")
    parser.add_argument(
        "--stack-dir",
        type=Path,
        help="a `controller up` stack's state folder: load and unload through its supervisor (else: the host agents)",
    )
    parser.add_argument("--eds-dir", type=Path, help="Envoy's endpoint files: evictions mark DRAINING there first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = make_plan(load_spec(args.spec))
    key = read_worker_key(args.secrets_dir)
    mover: Mover = LocalMover(StateDir(args.stack_dir), key, plan) if args.stack_dir else AgentMover(plan, key)
    ports = plan.fleet.gateway.ports
    app = create_app(plan, mover, EnvoyTraffic(ports.envoy_admin, args.eds_dir), key)
    uvicorn.run(app, host="127.0.0.1", port=ports.swapper, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
