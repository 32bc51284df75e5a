"""`controller schema`: the JSON Schema of fleet.yaml, generated from the spec models."""

from __future__ import annotations

from typing import Any

from controller.cli.common import emit_json
from controller.spec.models import Fleet


def fleet_schema() -> dict[str, Any]:
    schema = Fleet.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fleet.yaml"
    return schema


def schema() -> None:
    """Print the JSON Schema of the fleet spec (for editors and CI checks)."""
    emit_json(fleet_schema())
