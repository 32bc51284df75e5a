"""The `controller` command: thin verbs that parse arguments, call the core, print.

One module per verb. Errors the user can fix are ``ControllerError``s,
printed as one line each on stderr with the error's exit code; no traceback.
"""

from __future__ import annotations

import sys

import typer

from controller.cli import deploy as deploy_cmd
from controller.cli import down as down_cmd
from controller.cli import images as images_cmd
from controller.cli import keys as keys_cmd
from controller.cli import logs as logs_cmd
from controller.cli import mesh as mesh_cmd
from controller.cli import plan as plan_cmd
from controller.cli import process as process_cmd
from controller.cli import render as render_cmd
from controller.cli import schema as schema_cmd
from controller.cli import status as status_cmd
from controller.cli import swap as swap_cmd
from controller.cli import up as up_cmd
from controller.cli import usage as usage_cmd
from controller.cli import validate as validate_cmd
from controller.errors import ControllerError

app = typer.Typer(
    name="controller",
    help="Plan, render and run a self-hosted LLM inference fleet from one fleet.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("validate")(validate_cmd.validate)
app.command("plan")(plan_cmd.plan)
app.command("render")(render_cmd.render)
app.command("schema")(schema_cmd.schema)
app.command("up")(up_cmd.up)
app.command("down")(down_cmd.down)
app.command("status")(status_cmd.status)
app.command("restart")(process_cmd.restart)
app.command("stop")(process_cmd.stop)
app.command("start")(process_cmd.start)
app.command("logs")(logs_cmd.logs)
app.command("load")(swap_cmd.load)
app.command("unload")(swap_cmd.unload)
app.command("usage")(usage_cmd.usage)
app.command("mesh")(mesh_cmd.mesh)
app.command("deploy")(deploy_cmd.deploy)
app.add_typer(keys_cmd.app, name="keys")
app.add_typer(images_cmd.app, name="images")


def main() -> None:
    try:
        # In non-standalone mode click returns a `typer.Exit` code instead of exiting.
        result = app(standalone_mode=False)
        if isinstance(result, int) and result:
            sys.exit(result)
    except ControllerError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors (typer.BadParameter, an unknown option) arrive here in non-standalone mode
        # Typer 0.2x carries its own copy of click (typer._click): its ClickException is not click's, so it is known
        # by its name, in either copy.
        if any(cls.__name__ == "ClickException" for cls in type(exc).__mro__):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
