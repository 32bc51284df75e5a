"""`controller down`: stop the local stack; no process is left behind."""

from __future__ import annotations

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.local import stack


def down(state_opt: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Stop the supervisor and every process of the stack."""
    stopped = stack.down(state_dir(state_opt))
    if as_json:
        emit_json({"stopped": stopped})
        return
    console().print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")
