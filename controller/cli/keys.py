"""`controller keys create|list|revoke|rotate`: API keys of the gateway (shown once, stored hashed)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.errors import ControllerError
from controller.gateway.access import Access
from controller.gateway.keystore import KeyStore, app_problem
from controller.local.state import StateDir
from controller.spec import load_spec

app = typer.Typer(help="Create, list, revoke and rotate API keys.", no_args_is_help=True)
SpecOpt = Annotated[Path | None, typer.Option("--spec", help="The fleet spec (default: the running stack's).")]


def _store(state: StateDir) -> KeyStore:
    return KeyStore(state.gatekeeper / "keys.db")


def _spec_path(state: StateDir, spec: Path | None) -> Path:
    if spec is not None:
        return spec
    stack = state.read_json(state.root / "stack.json") or {}
    if not stack.get("spec"):
        raise ControllerError(f"no stack in {state.root}; give --spec FILE")
    return Path(stack["spec"])


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not match:
        raise ControllerError(f"--expires {text!r}: use a number and a unit, e.g. 90m, 12h, 30d, 2w")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return int(match.group(1)) * scale


@app.command("create")
def create(
    user: Annotated[str, typer.Option("--user", help="A user from the spec.")],
    models: Annotated[str | None, typer.Option("--models", help="Restrict the key to these models, A,B.")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="Lifetime, e.g. 30d, 12h.")] = None,
    label: Annotated[str | None, typer.Option("--label", help="A note shown in `keys list`.")] = None,
    app_name: Annotated[
        str | None,
        typer.Option("--app", help="The app the key is for; its requests carry it in usage and the console."),
    ] = None,
    spec: SpecOpt = None,
    state_opt: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once."""
    state = state_dir(state_opt)
    problem = None if app_name is None else app_problem(app_name)
    if problem is not None:
        raise ControllerError(f"--app {problem}")
    fleet = load_spec(_spec_path(state, spec)).fleet
    if not Access(fleet).user_exists(user):
        known = ", ".join(sorted(u.name for u in fleet.users)) or "none"
        raise ControllerError(f"--user {user!r}: not a user of the spec; known: {known}")
    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    served = {n for m in fleet.models for n in m.served_names}
    for name in wanted or []:
        if name not in served:
            raise ControllerError(f"--models: unknown model {name!r}; known: {', '.join(sorted(served))}")
    until = time.time() + parse_duration(expires) if expires else None
    key, record = _store(state).create(user, wanted, until, label, app_name)
    if as_json:
        emit_json({"key": key, **record.as_dict()})
        return
    for_app = f", app {app_name}" if app_name else ""
    console().print(f"{key}\n(key id {record.id}, user {user}{for_app}; shown once, store it now)", markup=False)


@app.command("list")
def list_keys(state_opt: StateOpt = None, as_json: JsonOpt = False) -> None:
    """List keys (ids, users, models, expiry; never the keys themselves)."""
    records = _store(state_dir(state_opt)).list()
    if as_json:
        emit_json([r.as_dict() for r in records])
        return
    table = Table()
    for col in ("id", "user", "app", "models", "label", "created", "expires", "state"):
        table.add_column(col)
    for r in records:
        state = "revoked" if r.revoked else ("expired" if not r.active() else "active")
        table.add_row(
            r.id,
            r.user,
            r.app or "",
            ",".join(r.models) if r.models else "(user's)",
            r.label or "",
            _when(r.created),
            _when(r.expires) if r.expires else "never",
            state,
        )
    console().print(table)


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (see `keys list`).")], state_opt: StateOpt = None
) -> None:
    """Revoke a key; it stops working within the spec's revocation delay."""
    if not _store(state_dir(state_opt)).revoke(key_id):
        raise ControllerError(f"no active key with id {key_id!r}")
    console().print(f"revoked {key_id}")


@app.command("rotate")
def rotate(
    key_id: Annotated[str, typer.Argument(help="The key id to replace.")],
    state_opt: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a key by a new one (same user, models, expiry); the old one is revoked."""
    result = _store(state_dir(state_opt)).rotate(key_id)
    if result is None:
        raise ControllerError(f"no active key with id {key_id!r}")
    key, record = result
    if as_json:
        emit_json({"key": key, **record.as_dict()})
        return
    console().print(f"{key}\n(key id {record.id} replaces {key_id}; shown once)", markup=False)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
