"""`controller render FILE -o DIR`: write every artifact atomically, or `--check` / `--dry-run` them (write nothing)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated

import typer

from controller.atomic import write_file, write_tree
from controller.cli.common import JsonOpt, SpecArg, console, emit_json, load_plan
from controller.errors import RenderError
from controller.render import render_all

MANIFEST = ".fleet-render.json"  # the files the last render wrote, so stale ones can be removed


def render(
    spec: SpecArg,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("rendered"),
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Write nothing; list each file that differs (or is missing) and each stale file; exit 1 if any.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            "--diff",
            help="Write nothing; print a unified diff of what a render would change (files it would write or "
            "remove); exit 1 if anything would change, 0 if nothing would.",
        ),
    ] = False,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="Only these renderers.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Render Compose, Quadlet, Envoy and Caddy files for every host.

    Without --check or --dry-run: write every file atomically, and remove those the last render wrote and this one does not.
    """
    files = render_all(load_plan(spec), only=target)
    old = _manifest(out_dir)
    changed = [p for p, text in files.items() if _read(out_dir / p) != text]
    stale = sorted(set(old) - set(files))
    if check or dry_run:
        if as_json:
            emit_json({"ok": not changed and not stale, "changed": changed, "stale": stale})
        else:
            if dry_run:
                _print_diff(out_dir, files, changed, stale)
            if check:
                for path in changed:
                    console().print(f"differs: {out_dir / path}")
                for path in stale:
                    console().print(f"stale: {out_dir / path}")
            if dry_run and not check:
                console().print(
                    f"would change {len(changed)} file(s) and remove {len(stale)} in {out_dir}; nothing written"
                    if changed or stale
                    else f"{out_dir} is up to date; nothing written"
                )
        if changed or stale:
            raise typer.Exit(1)
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise RenderError(f"{out_dir}: exists and is not a folder")
    write_tree(out_dir, files)
    for path in stale:
        (out_dir / path).unlink(missing_ok=True)
    write_file(out_dir / MANIFEST, json.dumps(sorted(files), indent=1) + "\n")
    if as_json:
        emit_json({"out": str(out_dir), "files": sorted(files), "changed": changed, "removed": stale})
        return
    console().print(f"rendered {len(files)} file(s) to {out_dir}: {len(changed)} changed, {len(stale)} removed")


def _manifest(out_dir: Path) -> list[str]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [p for p in data if isinstance(p, str) and ".." not in Path(p).parts]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _print_diff(out_dir: Path, files: dict[str, str], changed: list[str], stale: list[str]) -> None:
    for path in changed:
        before = (_read(out_dir / path) or "").splitlines(keepends=True)
        after = files[path].splitlines(keepends=True)
        typer.echo("".join(difflib.unified_diff(before, after, f"a/{path}", f"b/{path}")), nl=False)
    for path in stale:
        typer.echo(f"--- a/{path}\n+++ /dev/null (removed)")
