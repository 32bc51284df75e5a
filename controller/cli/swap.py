"""`controller load|unload MODEL`: make an on-demand model resident, or evict it, in the local stack.

The same action as the console's Load / Unload buttons (controller/console/actions.py), through the stack's swap
coordinator, and written to the same audit log (`console-audit.log` in the gatekeeper's state) with the operator's
login name. A load evicts what it must (least recently used first, each after its requests have finished) and
returns once the model answers; a refusal (it would not fit, it is not swappable, a drain that did not finish) is
the coordinator's own message, with its numbers.
"""

from __future__ import annotations

import getpass
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.console.actions import AUDIT_FILE, Actions, Audit
from controller.console.auth import Session
from controller.errors import ControllerError
from controller.gateway.keystore import KeyStore
from controller.local import stack
from controller.plan import make_plan
from controller.secrets import read_worker_key
from controller.spec import load_spec

ModelArg = Annotated[str, typer.Argument(help="An on-demand model (one with `swap`), by name or alias.")]


def load(model: ModelArg, state_opt: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Make an on-demand model resident now (evicting others of its GPUs if it must), and wait until it is."""
    _act("load", model, state_opt, as_json)


def unload(model: ModelArg, state_opt: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Evict an on-demand model now, once its requests in flight have finished."""
    _act("unload", model, state_opt, as_json)


def _act(action: str, model: str, state_opt: Path | None, as_json: bool) -> None:
    state = state_dir(state_opt)
    info = stack.status(state)
    if not info["running"] or not info.get("spec"):
        raise ControllerError(f"no stack is running in {state.root}; start one with `controller up SPEC`")
    spec = Path(str(info["spec"]))
    actions = Actions(
        plan_of=lambda: make_plan(load_spec(spec)),
        keys=KeyStore(state.gatekeeper / "keys.db"),
        audit=Audit(state.gatekeeper / AUDIT_FILE),
        worker_key=lambda: read_worker_key(state.secrets),
        stack=state,
    )
    user = getpass.getuser()
    session = Session(user=user, groups=(), via="controller CLI", csrf="", expires=0.0)
    out = console()
    began = time.monotonic()
    if as_json:
        result = actions.run(session, {"action": action, "target": model})
    else:
        # A load can take minutes (evictions drain first, then the backend loads): say what is going on.
        with out.status(f"{action}ing {model} (the swap coordinator of {state.root})"):
            result = actions.run(session, {"action": action, "target": model})
    took = time.monotonic() - began
    swap: dict[str, Any] = result.get("swap") or {}
    if as_json:
        emit_json({"model": model, "action": action, "seconds": round(took, 3), **swap})
        return
    detail = ""
    if action == "load" and swap.get("last_load"):
        last = swap["last_load"]
        detail = f" (evictions {last.get('unload_s', 0):.2f}s, load {last.get('load_s', 0):.2f}s)"
    out.print(f"{model}: {swap.get('state', action + 'ed')} after {took:.2f}s{detail} (audit log: {user}, CLI)")
