"""`controller mesh FILE`: make the hosts' WireGuard keys (once) and write each host's wg-quick config.

Keys are kept in the state folder (``<state>/mesh/<fleet>/``); the configs go to the same folder as
`controller render` writes (``rendered`` by default), as ``<host>/wireguard/<interface>.conf``, with public keys
only. For a Tailscale or Nebula mesh nothing is rendered: the hosts' declared addresses are used as they are.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.atomic import write_file, write_tree
from controller.cli.common import JsonOpt, SpecArg, StateOpt, console, emit_json, load, state_dir
from controller.errors import RenderError
from controller.mesh.wireguard import (
    HostMesh,
    check_mesh,
    ensure_keys_report,
    mesh_hosts,
    render_config,
    unreachable_pairs,
)

MANIFEST = ".fleet-mesh.json"  # the files the last `controller mesh` wrote, so stale ones can be removed
CONFIG_MODE = 0o600  # no secret inside, but wg-quick warns about a world-readable config


def mesh(
    spec: SpecArg,
    state: StateOpt = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (the one `controller render` writes).")
    ] = Path("rendered"),
    rotate: Annotated[
        list[str] | None,
        typer.Option("--rotate", help="Replace this host's key pair with a new one (repeatable); redeploy every host."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make the WireGuard key pairs (once; kept in the state folder) and write every host's wg-quick config."""
    loaded = load(spec)
    fleet = loaded.fleet
    kind = fleet.mesh.kind
    if kind != "wireguard":
        message = f"mesh kind {kind!r}: nothing to render; the hosts' declared addresses are used as they are"
        if as_json:
            listed = [
                {"name": h.name, "address": str(h.address)} for h in sorted(fleet.hosts or [], key=lambda h: h.name)
            ]
            emit_json({"kind": kind, "rendered": False, "message": message, "hosts": listed})
        else:
            console().print(message)
        return
    check_mesh(fleet, loaded.locations.problem)  # before any key is made
    if out_dir.exists() and not out_dir.is_dir():
        raise RenderError(f"{out_dir}: exists and is not a folder; give --out a folder")
    keys = ensure_keys_report(state_dir(state), fleet, rotate or [])
    hosts = mesh_hosts(fleet, keys.public_keys, loaded.locations.problem)
    files = {h.path: render_config(h) for h in hosts}
    stale = sorted(set(_manifest(out_dir)) - set(files))
    changed = write_tree(out_dir, files, dict.fromkeys(files, CONFIG_MODE))
    for path in stale:
        (out_dir / path).unlink(missing_ok=True)
    write_file(out_dir / MANIFEST, json.dumps(sorted(files), indent=1) + "\n")
    pairs = unreachable_pairs(fleet)
    if as_json:
        emit_json(
            {
                "kind": kind,
                "rendered": True,
                "out": str(out_dir),
                "key_folder": str(keys.folder),
                "generated": keys.generated,
                "files": sorted(files),
                "changed": changed,
                "removed": stale,
                "unreachable_pairs": [list(p) for p in pairs],
                "hosts": [_host_json(h, out_dir) for h in hosts],
            }
        )
        return
    out = console()
    for h in hosts:
        out.print(f"{h.name}: {h.interface} {h.address} port {h.listen_port} public key {h.public_key}")
        for p in h.peers:
            dial = f"endpoint {p.endpoint}" if p.endpoint else "no endpoint (it dials in)"
            keepalive = f", keepalive {p.keepalive}s" if p.keepalive else ""
            out.print(f"  peer {p.name} {p.allowed_ips} {dial}{keepalive} key {p.public_key}")
    for a, b in pairs:
        print(f"warning: hosts {a} and {b} both lack `endpoint`, so they cannot reach each other", file=sys.stderr)
    kept = len(hosts) - len(keys.generated)
    made = f"made for {', '.join(keys.generated)}" if keys.generated else "none made"
    out.print(f"keys in {keys.folder}: {made}, {kept} kept")
    out.print(f"wrote {len(files)} config(s) to {out_dir}: {len(changed)} changed, {len(stale)} removed")


def _host_json(h: HostMesh, out_dir: Path) -> dict[str, Any]:
    data = asdict(h)
    data["config"] = str(out_dir / h.path)
    data["peers"] = [asdict(p) for p in h.peers]
    return data


def _manifest(out_dir: Path) -> list[str]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [p for p in data if isinstance(p, str) and ".." not in Path(p).parts and not Path(p).is_absolute()]
