"""`controller deploy`: the fleet onto its hosts over SSH with Ansible (controller/deploy/)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.common import JsonOpt, SpecArg, StateOpt, emit_json, load, state_dir
from controller.deploy.ansible import FORKS, Connection
from controller.deploy.engine import Options
from controller.deploy.engine import deploy as run_deploy
from controller.plan import make_plan


def deploy(
    spec: SpecArg,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Deploy only this host (repeatable).", show_default=False)
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Show per host what would change; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Apply without asking.")] = False,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for another deploy of this fleet to finish.")
    ] = 0,
    compose: Annotated[
        str | None,
        typer.Option(
            "--compose",
            help="The compose command on the hosts (default: podman-compose where installed, else docker compose).",
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            help="TAG=ARCHIVE: a project image (from `controller images build`, saved with `podman save`) to "
            "load on hosts that lack it (repeatable).",
            show_default=False,
        ),
    ] = None,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            help="Seconds a replica's requests (streams included) may take to finish before it is replaced.",
        ),
    ] = 120,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            min=1,
            help="Serving replicas replaced at once in a rolling update, each of another model on another host "
            "(1: one at a time).",
        ),
    ] = FORKS,
    ssh_config: Annotated[
        Path | None, typer.Option("--ssh-config", help="An ssh_config file for reaching the hosts.", show_default=False)
    ] = None,
    ssh_key: Annotated[
        Path | None, typer.Option("--ssh-key", help="The SSH private key for the hosts.", show_default=False)
    ] = None,
    state: StateOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Deploy the fleet: lock, probe and preflight every host, show the diff, then apply host by host.

    Exit codes: 0 applied or no change; 10 some hosts failed and were rolled back, the others applied;
    4 nothing was changed (preflight, probe or spec problem; or changes found without --yes); 75 another
    deploy of this fleet holds the lock.
    """
    loaded = load(spec)
    plan = make_plan(loaded)
    images = {}
    for item in image or []:
        tag, sep, archive = item.partition("=")
        if not sep or not Path(archive).is_file():
            raise typer.BadParameter(f"--image {item!r}: give TAG=ARCHIVE with an existing archive file")
        images[tag] = Path(archive)
    opts = Options(
        hosts=host or None,
        check=check,
        yes=yes,
        wait_s=wait,
        compose=compose,
        images=images,
        drain_s=drain_timeout,
        parallel=parallel,
        conn=Connection(ssh_config, ssh_key),
    )
    started = time.monotonic()

    def progress(where: str, message: str) -> None:
        if json_out:
            return
        stamp = f"{time.monotonic() - started:6.1f}s"
        print(f"{stamp}  {where + ':' if where else ''} {message}".rstrip(), file=sys.stderr, flush=True)

    outcome = run_deploy(loaded, plan, state_dir(state).root, opts, progress)
    if json_out:
        emit_json(outcome.as_dict())
    else:
        for problem in outcome.problems:
            print(f"error: {problem}", file=sys.stderr)
        if outcome.problems:
            print("preflight failed: nothing was changed anywhere", file=sys.stderr)
        for name, info in outcome.as_dict()["hosts"].items():
            line = f"{name}: {info['result']}"
            if name in outcome.failed:
                f = outcome.failed[name]
                line += f" at step '{f['step']}': {f['message']}"
            print(line)
        for name, info in outcome.as_dict()["retire"].items():
            if name in outcome.failed:
                f = outcome.failed[name]
                print(f"{name}: no longer in the spec; retiring failed at step '{f['step']}': {f['message']}")
            elif info["result"] == "retired":
                kept = f"; volumes kept: {', '.join(info['volumes_kept'])}" if info["volumes_kept"] else ""
                print(f"{name}: no longer in the spec, retired{kept}")
            else:
                print(f"{name}: no longer in the spec: would be retired (containers, files, mesh interface)")
        verdict = {0: "done", 4: "nothing was changed", 10: "some hosts were rolled back"}[outcome.exit_code]
        print(f"deploy {'--check ' if check else ''}{verdict} in {outcome.seconds:.1f} s")
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)
