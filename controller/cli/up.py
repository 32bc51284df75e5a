"""`controller up [FILE | --demo]`: run a single-host fleet as supervised local processes."""

from __future__ import annotations

import importlib.util
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, emit_json, state_dir
from controller.errors import ControllerError
from controller.local import stack
from controller.local.demo import DEMO_USER, ON_DEMAND, DemoKey, DemoPorts, demo_key, write_demo


def up(
    spec: Annotated[Path | None, typer.Argument(help="A single-host fleet spec.", show_default=False)] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Run the built-in demo: a tiny model on CPU.")] = False,
    https_port: Annotated[int, typer.Option(help="--demo: the HTTPS port of the API.")] = 8443,
    wait: Annotated[float, typer.Option(help="Seconds to wait for every process to be healthy.")] = 180,
    state_opt: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start (or confirm) the stack: workers, Envoy, Caddy and the gatekeeper. Idempotent.

    With --demo it prints the demo user's API key: minted once (it expires in 30 days), kept in the state folder
    (gatekeeper/demo-key, mode 0600) and printed again by every later `up --demo`, until it expires or is revoked.
    """
    state = state_dir(state_opt)
    if demo == (spec is not None):
        raise ControllerError("give a spec file or --demo (one of them)")
    if demo:
        spec = write_demo(state, DemoPorts(https=https_port))
    assert spec is not None
    with _Progress(enabled=not as_json and sys.stdout.isatty()) as progress:
        info = stack.up(spec, state, wait, progress.update)
    key = demo_key(state) if demo else None
    if as_json:
        emit_json(
            {
                "base_url": info.base_url,
                "ca_cert": str(info.ca_cert),
                "api_key": key.key if key else None,
                "api_key_reused": key.reused if key else None,
                "api_key_expires": key.record.expires if key else None,
                "already_running": info.already_running,
                "restarted": list(info.restarted),
                "started": list(info.started),
                "stopped": list(info.stopped),
                "state_dir": str(state.root),
                "prometheus_url": info.prometheus_url,
                "console_url": f"{info.base_url.removesuffix('/v1')}/console",
            }
        )
        return
    lines = [
        "already running" if info.already_running else "up: every process is healthy",
        *([reload_line(info)] if info.restarted or info.started or info.stopped else []),
        f"base URL:  {info.base_url}",
        f"CA cert:   {info.ca_cert}",
        f"console:   {info.base_url.removesuffix('/v1')}/console  (admins: sign in with an admin's API key"
        + (", the demo's below)" if key else ")"),
    ]
    if info.prometheus_url:
        lines.append(f"metrics:   {info.prometheus_url}  (Prometheus: GPU, model, gateway and usage series; alerts)")
    if key:
        lines += [
            f"API key:   {key.key}   ({key_note(key)})",
            "",
            f"try it with the openai SDK ({openai_hint()}):",
            f"  export SSL_CERT_FILE={shlex.quote(str(info.ca_cert))} OPENAI_BASE_URL={info.base_url} "
            f"OPENAI_API_KEY={key.key}",
            f'  {shlex.quote(sys.executable)} -c "import openai; s = openai.OpenAI().chat.completions.create('
            "model='tiny-chat', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=32, stream=True); "
            "[print(c.choices[0].delta.content or '', end='', flush=True) for c in s if c.choices]; print()\"",
            "tools that speak Anthropic's Messages API (the anthropic SDK, Claude Code) take the same key:",
            f"  export SSL_CERT_FILE={shlex.quote(str(info.ca_cert))} "
            f"ANTHROPIC_BASE_URL={info.base_url.removesuffix('/v1')} ANTHROPIC_API_KEY={key.key}",
            f'  {shlex.quote(sys.executable)} -c "import anthropic; m = anthropic.Anthropic().messages.create('
            "model='tiny-chat', max_tokens=32, messages=[{'role': 'user', 'content': 'hi'}]); "
            'print(m.content[0].text)"',
            f"on demand: {' and '.join(ON_DEMAND)} share one slot: a request for the one not loaded loads it "
            "(a few seconds; the other is unloaded once its requests finish); use it as model= above",
        ]
    where = "" if state_opt is None else f" --state-dir {shlex.quote(str(state.root))}"
    ctl = own_program("controller")
    lines += ["", f"status: {ctl} status{where}    stop: {ctl} down{where}"]
    typer.echo("\n".join(lines))


def reload_line(info: stack.StackInfo) -> str:
    """What a changed spec did to the running stack (Envoy reloads its files by itself, and is named only when
    its bootstrap changed)."""
    parts = [
        f"{verb} {', '.join(names)}"
        for verb, names in (("restarted", info.restarted), ("started", info.started), ("stopped", info.stopped))
        if names
    ]
    return "spec changed: " + "; ".join(parts) + "; the rest kept running"


def key_note(key: DemoKey) -> str:
    """What a user needs to know about the demo key: whose, whether it is the one printed before, until when."""
    expires = time.strftime("%Y-%m-%d", time.localtime(key.record.expires)) if key.record.expires else "never"
    kind = "reused" if key.reused else "new"
    return f"user {DEMO_USER}; {kind}, expires {expires}; kept in {key.path} for the next `up --demo`"


def openai_hint() -> str:
    """Where the snippet's `openai` comes from: this Python has it (scripts/bootstrap installs it), or how to get it."""
    if importlib.util.find_spec("openai") is not None:
        return "this Python has it"
    return f"first: {shlex.quote(sys.executable)} -m pip install openai"


def own_program(name: str) -> str:
    """How a new shell runs one of this package's commands: by its absolute path beside this Python (the
    virtual environment's `bin/`, which a new shell does not have on PATH), else by name."""
    beside = Path(sys.executable).parent / name
    return shlex.quote(str(beside)) if beside.is_file() else name


class _Progress:
    """A live table of processes while `up` waits (on a terminal); plain lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live: Live | None = None
        self.last: dict[str, str] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.live = Live(Table(), refresh_per_second=8, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, procs: dict[str, Any]) -> None:
        if self.live is None:
            for name, row in procs.items():
                if self.last.get(name) != row["state"]:
                    self.last[name] = row["state"]
                    print(f"  {name}: {row['state']}", file=sys.stderr, flush=True)
            return
        table = Table(title="starting", title_justify="left")
        for col in ("process", "state", "pid", "restarts"):
            table.add_column(col)
        for name, row in procs.items():
            table.add_row(name, row["state"], str(row["pid"] or "-"), str(row["restarts"]))
        self.live.update(table)
