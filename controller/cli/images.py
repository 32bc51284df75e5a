"""`controller images build|list`: the project's own images (gatekeeper, agent), built with no registry.

The engine's global arguments come from ``--engine-arg`` (repeatable) or ``$FLEET_ENGINE_ARGS`` (split like a
shell line), e.g. a private store: ``--root DIR --runroot DIR --storage-driver vfs``; its environment
(``CONTAINERS_CONF`` included) is this command's.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.common import JsonOpt, console, emit_json, load
from controller.images.build import (
    LABEL_CONTENT,
    LABEL_IMAGE,
    LABEL_VERSION,
    build_images,
    default_tags,
    engine_command,
    image_info,
)

ENGINE_ARGS_ENV = "FLEET_ENGINE_ARGS"

app = typer.Typer(help="Build and list the project's own container images (gatekeeper, agent).", no_args_is_help=True)

OptSpec = Annotated[
    Path | None,
    typer.Argument(help="The fleet spec whose `images` name the tags (default: the default tags).", show_default=False),
]
EngineOpt = Annotated[str, typer.Option("--engine", help="The container engine: podman (or docker).")]
EngineArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--engine-arg",
        help=f"A global argument for the engine, e.g. --engine-arg=--root=/tmp/store (repeatable; "
        f"default: ${ENGINE_ARGS_ENV}, split like a shell line).",
        show_default=False,
    ),
]


def _engine(engine: str, engine_arg: list[str] | None) -> list[str]:
    extra = engine_arg if engine_arg else shlex.split(os.environ.get(ENGINE_ARGS_ENV, ""))
    return engine_command(engine, extra)


def _tags(spec: Path | None) -> dict[str, str]:
    return default_tags(load(spec).fleet.images if spec is not None else None)


@app.command("build")
def build(
    spec: OptSpec = None,
    engine: EngineOpt = "podman",
    engine_arg: EngineArgOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Import again even where the content is cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build the gatekeeper and agent images from this installation, tagged as the spec's `images` say."""
    cmd = _engine(engine, engine_arg)
    tags = _tags(spec)
    out = console()
    progress = None if as_json else (lambda line: out.print(line, markup=False))
    result = build_images(cmd, tags, env=os.environ, progress=progress, force=force)
    if as_json:
        emit_json(result.as_json())


@app.command("list")
def list_images(
    spec: OptSpec = None,
    engine: EngineOpt = "podman",
    engine_arg: EngineArgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show whether each project image is present under its tag, with its id, version and size."""
    cmd = _engine(engine, engine_arg)
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for name, tag in _tags(spec).items():
        info = image_info(cmd, tag, os.environ)
        labels = info["labels"] if info else {}
        rows.append(
            {
                "name": name,
                "tag": tag,
                "present": info is not None,
                "id": info["id"] if info else None,
                "size": info["size"] if info else None,
                "version": labels.get(LABEL_VERSION),
                "image": labels.get(LABEL_IMAGE),
                "content": labels.get(LABEL_CONTENT),
            }
        )
        if info is None:
            lines.append(f"{tag}: missing (controller images build)")
        else:
            size = info["size"] / 2**20
            lines.append(f"{tag}: image {info['id'][:12]}, version {labels.get(LABEL_VERSION)}, {size:.1f} MiB")
    if as_json:
        emit_json(rows)
        return
    out = console()
    for line in lines:
        out.print(line, markup=False)
