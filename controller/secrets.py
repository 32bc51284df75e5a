"""The worker secret: the one credential that lets a request into a worker.

Workers (llama-server, vLLM) accept only requests that carry it; Envoy adds it
on the way upstream (its credential injector, from a file-SDS secret), so a
request that did not pass the gateway — keys, ACL, limits, ledger — is refused
by the worker itself. It is generated once, kept in files of mode 0600 in a
private folder, and never written into a rendered file, a command line or a
log: llama-server reads it with ``--api-key-file``, vLLM from ``VLLM_API_KEY``
set from the file at start, Envoy from its SDS file.

Files (in the folder given, the stack's ``secrets/`` or ``/etc/fleet/secrets``
on a host):

    worker.key         the secret itself, for the workers
    worker-sds.yaml    the same as an Envoy SDS generic secret, "Bearer <secret>"
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import yaml

from controller.atomic import write_file

KEY_FILE = "worker.key"
SDS_FILE = "worker-sds.yaml"
SDS_NAME = "worker"  # the secret's name inside the SDS file, as the Envoy config asks for it


def ensure_worker_secret(folder: Path) -> Path:
    """Create the worker secret in ``folder`` once (mode 0700, files 0600); return the key file's path.

    An existing secret is kept, so restarting a stack never locks out workers that are still running.
    """
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    key_file = folder / KEY_FILE
    try:
        key = key_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = ""
    if not key:
        key = secrets.token_urlsafe(32)
        write_file(key_file, key + "\n", mode=0o600)
    sds = yaml.safe_dump(sds_document(key), sort_keys=False)
    sds_file = folder / SDS_FILE
    if not sds_file.exists() or sds_file.read_text(encoding="utf-8") != sds:
        write_file(sds_file, sds, mode=0o600)
    return key_file


def sds_document(key: str) -> dict[str, object]:
    return {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": SDS_NAME,
                "generic_secret": {"secret": {"inline_string": f"Bearer {key}"}},
            }
        ]
    }


def read_worker_key(folder: Path) -> str:
    """The worker secret (for the controller's own calls to workers: health, load/unload, tests)."""
    return (folder / KEY_FILE).read_text(encoding="utf-8").strip()
