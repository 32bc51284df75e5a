"""`controller restart|stop|start NAME`: act on one process of the local stack."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.common import StateOpt, console, state_dir
from controller.local import stack

NameArg = Annotated[str, typer.Argument(help="A worker name (see `controller status`), or envoy, caddy, gatekeeper.")]


def restart(name: NameArg, state_opt: StateOpt = None) -> None:
    """Restart one process now (no backoff)."""
    console().print(stack.request(state_dir(state_opt), "restart", name)["message"])


def stop(name: NameArg, state_opt: StateOpt = None) -> None:
    """Stop one process and keep it stopped (unload a model) until `controller start`."""
    console().print(stack.request(state_dir(state_opt), "stop", name)["message"])


def start(name: NameArg, state_opt: StateOpt = None) -> None:
    """Start a process that `controller stop` held."""
    console().print(stack.request(state_dir(state_opt), "start", name)["message"])
