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


def self_signed(name: str, days: float = 1, key: Any = None) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``name`` (PEM chain, PEM key), valid for ``days`` (negative: expired that long ago)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1) + min(0.0, 2 * days) * datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
