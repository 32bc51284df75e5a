"""The rendered Envoy configuration as one static bootstrap that runs here: what `envoy --mode validate` checks
(tests/contract/test_artifacts.py) and what bench/control_plane.py starts at fleet size.

Validation does not follow the LDS/CDS files the rendered bootstrap names, so the rendered listeners and clusters go
into it as static resources, with the container's paths pointed at folders that exist here (the only changes): the
usage and live logs, the TLS folder holding an SDS file with a certificate as the gatekeeper would publish it, the
worker secret as deploy puts it on the gateway host, the endpoint files, the front socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controller.gateway.certs import sds_document
from controller.render.envoy import (
    CLUSTERS_FILE,
    EDS_DIR,
    FRONT_SOCKET,
    LISTENERS_FILE,
    SECRETS_DIR,
    TLS_DIR,
    USAGE_LOG,
    XDS_FOLDER,
    live_log_path,
)
from controller.secrets import ensure_worker_secret
from tests.helpers import self_signed


def static_bootstrap(config: Path, work: Path, eds_dir: Path | None = None) -> dict[str, Any]:
    """The bootstrap in ``config`` (a rendered `envoy/envoy.yaml`, its xds/ and eds/ beside it) with its
    listeners and clusters static and its paths in ``work``; ``eds_dir``: endpoint files to use instead of the
    rendered ones."""
    bootstrap: dict[str, Any] = yaml.safe_load(config.read_text())
    bootstrap.pop("dynamic_resources")
    tls = work / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    (tls / "sds.yaml").write_text(sds_document(*self_signed("localhost")))
    ensure_worker_secret(work / "secrets")
    moves = {
        USAGE_LOG: str(work / "usage.log"),
        live_log_path(USAGE_LOG): str(work / "live.log"),
        TLS_DIR: str(tls),
        SECRETS_DIR: str(work / "secrets"),
        EDS_DIR: str(eds_dir or config.parent / "eds"),
        FRONT_SOCKET: str(work / "front.sock"),
    }

    def resources(name: str) -> list[dict[str, Any]]:
        text = (config.parent / XDS_FOLDER / name).read_text()
        for old, new in moves.items():
            text = text.replace(old, new)
        return [{k: v for k, v in r.items() if k != "@type"} for r in yaml.safe_load(text)["resources"]]

    bootstrap["static_resources"] = {"listeners": resources(LISTENERS_FILE), "clusters": resources(CLUSTERS_FILE)}
    return bootstrap
