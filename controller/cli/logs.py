"""`controller logs NAME`: the log of one process of the local stack."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.common import StateOpt, state_dir
from controller.errors import ControllerError
from controller.local import logcap


def logs(
    name: Annotated[str, typer.Argument(help="A process name (see `controller status`), or supervisor.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines from the end.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    state_opt: StateOpt = None,
) -> None:
    """Print the end of a process's log (NAME.log, and NAME.log.1 from before its last cut when it has fewer lines).

    Each log is kept to about 10 MiB: past that its newest part moves to NAME.log.1 and NAME.log starts again.
    """
    path = state_dir(state_opt).log(name)
    if "/" in name or not path.is_file():
        raise ControllerError(f"no log for {name!r} in {path.parent}")
    for line in logcap.tail_lines(path, lines):
        sys.stdout.write(line)
    sys.stdout.flush()
    if follow:
        _follow(path)
    raise typer.Exit(0)


def _follow(path: Path) -> None:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        while True:
            line = handle.readline()
            if line:
                sys.stdout.write(line.decode("utf-8", errors="replace"))
                sys.stdout.flush()
                continue
            if path.stat().st_size < handle.tell():  # cut back (controller/local/logcap.py): new lines start at the top
                handle.seek(0)
                continue
            time.sleep(0.2)
