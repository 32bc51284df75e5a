"""Small helpers for writing spec files in tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MINIMAL: dict[str, Any] = {
    "version": 1,
    "name": "t",
    "mesh": {"kind": "none"},
    "hosts": [
        {
            "name": "ws",
            "address": "127.0.0.1",
            "gpus": [
                {"uuid": "GPU-00000000-0000-4000-8000-000000000001", "name": "Test GPU", "vram_gib": 24},
                {"uuid": "GPU-00000000-0000-4000-8000-000000000002", "name": "Test GPU", "vram_gib": 24},
            ],
        }
    ],
    "models": [
        {
            "name": "m8b",
            "backend": "vllm",
            "source": {"huggingface": "org/m8b"},
            "arch": {"layers": 32, "kv_heads": 8, "head_dim": 128, "params_b": 8.0},
            "context": 8192,
            "parallel": 4,
        }
    ],
    "gateway": {
        "host": "ws",
        "public_name": "localhost",
        "tls": {"mode": "internal"},
        "ports": {"https": 8443, "http": 8080},
    },
    "users": [{"name": "me", "models": ["*"]}],
}


def write_spec(path: Path, data: dict[str, Any] | None = None, text: str | None = None) -> Path:
    path.write_text(text if text is not None else yaml.safe_dump(data or MINIMAL, sort_keys=False), encoding="utf-8")
    return path


def spec_with(**changes: Any) -> dict[str, Any]:
    """A deep copy of MINIMAL with top-level keys replaced."""
    import copy

    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data
