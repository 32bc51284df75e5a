"""`controller logs NAME`: the log of one process of the local stack."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Annotated

import typer

from controller.cli.common import StateOpt, state_dir
from controller.errors import ControllerError


def logs(
    name: Annotated[str, typer.Argument(help="A process name (see `controller status`), or supervisor.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines from the end.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    state_opt: StateOpt = None,
) -> None:
    """Print the end of a process's log."""
    path = state_dir(state_opt).log(name)
    if "/" in name or not path.is_file():
        raise ControllerError(f"no log for {name!r} in {path.parent}")
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line in deque(handle, maxlen=max(lines, 0)):
            sys.stdout.write(line)
        sys.stdout.flush()
        while follow:
            line = handle.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    raise typer.Exit(0)
