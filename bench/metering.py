"""What the request path pays for metering that cannot be dodged, and for each front door.

For each front door (``gateway.front``: ``envoy``, ``caddy``) one ``controller up`` stack in front of the
stub model (bench/stub.py, as in bench.gateway), measured with wrk on the public HTTPS port:

- ``unlimited``: a user without limits (Envoy reuses the gatekeeper's answer for an API key);
- ``quota``: a user with a daily token quota, so every request books its most with the gatekeeper before
  it is sent (``POST /auth/reserve``: one round trip, and one SQLite transaction, per request).

Reported per point: requests per second, wrk's p50 and p99, and the gateway's CPU per request (Envoy,
Caddy and the gatekeeper together, from /proc). The quota is large enough never to refuse.

    python -m bench.metering [--seconds 5] [--json] [--write docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.load import Target, wrk
from bench.paths import stub_fleet, stub_path
from bench.report import machine, publish

FRONTS = ("envoy", "caddy")
CONNECTIONS = (1, 64)
QUOTA_USER = "metered"
BEGIN, END = "<!-- bench:metering:begin -->", "<!-- bench:metering:end -->"


@contextmanager
def stack(tmp: Path, front: str) -> Iterator[tuple[Target, Target]]:
    """A stack with the stub model and ``front``; the targets of a user without limits and of one with a quota."""
    from tests.e2e.stack import cli, start_stack, stop_stack

    def customize(data: dict[str, Any]) -> None:
        stub_fleet(data)
        data["gateway"]["front"] = front
        data["users"].append({"name": QUOTA_USER, "models": ["*"], "daily_tokens": 10**12})

    running = start_stack(tmp / "stack", customize, env=stub_path(tmp / "bin"))
    try:
        procs = running.processes()
        gateway = {k: p["pid"] for p in procs.values() if (k := p["kind"]) in ("caddy", "envoy", "gatekeeper")}
        made = running.ctl("keys", "create", "--user", QUOTA_USER, "--json")
        if made.returncode != 0:
            raise RuntimeError(made.stderr)
        quota_key = json.loads(made.stdout)["key"]
        yield (
            Target("unlimited", running.base_url, running.key, processes=gateway),
            Target("quota", running.base_url, quota_key, processes=gateway),
        )
    finally:
        try:
            stop_stack(running)
        except BaseException:
            cli("down", "--state-dir", str(tmp / "stack" / "state"))
            raise


def run(seconds: float) -> list[dict[str, Any]]:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-metering-"))
    try:
        for front in FRONTS:
            with stack(tmp / front, front) as targets:
                for target in targets:
                    wrk(target, 8, 1)  # warm: connections open, answers fetched
                    for c in CONNECTIONS:
                        result = wrk(target, c, seconds)
                        cpu = round(sum(result["cpu_us_per_req"].values()), 1)
                        rows.append({"front": front, "user": target.name, **result, "gateway_cpu_us": cpu})
                        print(f"[bench] {front} {target.name} c={c}: {result['rps']} req/s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        BEGIN,
        f"Machine: {machine()}. Command: `{command}`. One wrk run per point (keep-alive, one thread, the "
        "load generator on the same two cores), on the public HTTPS port, against the stub model.",
        "",
        "| front | user | connections | req/s | p50 ms | p99 ms | gateway CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['front']} | {r['user']} | {r['c']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['gateway_cpu_us']:.0f} | {r['errors']} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.metering", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5, help="length of each wrk point")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the metering section of this Markdown file")
    args = parser.parse_args()
    publish(
        run(args.seconds),
        markdown,
        prog="bench.metering",
        as_json=args.json,
        write=args.write,
        section=(BEGIN, END, "Metering and front doors"),
    )


if __name__ == "__main__":
    main()
