"""The config files a local stack's gateway programs read, rendered from the plan with paths in its state folder.

One function makes them all, so `controller up` writes exactly what the process table's fingerprints were taken
over: a program whose files changed is restarted (a supervisor never adopts one running other files), and one
that reloads its files by itself (Envoy's listeners, clusters and endpoints) is left running.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from controller.local.state import StateDir
from controller.plan import Plan
from controller.render import alertmanager, caddy, envoy, prometheus
from controller.secrets import KEY_FILE

# Which programs read which of the files (relative to the state's config folder) at start only.
READ_AT_START = {
    "caddy": ("Caddyfile",),
    "envoy": ("envoy.yaml",),
    "prometheus": ("prometheus/",),
    "alertmanager": ("alertmanager/",),
}


def stack_files(plan: Plan, state: StateDir, draining: frozenset[str] = frozenset()) -> dict[Path, str]:
    """``{path: text}`` in the order to write them: Envoy's endpoints, then its clusters, then its listeners (a
    route never names a cluster Envoy was not given first), then its bootstrap. ``draining``: workers marked
    DRAINING in their models' endpoints (no new requests; those in flight finish)."""
    out: dict[Path, str] = {state.config / "Caddyfile": caddy.caddyfile(plan, front_socket=str(state.front_socket))}
    for name, doc in envoy.eds_files(plan, draining).items():
        out[state.config / envoy.EDS_FOLDER / name] = envoy.dump(doc)
    xds = envoy.xds_files(
        plan,
        usage_log=str(state.usage_log),
        tls_dir=str(state.tls),
        secrets_dir=str(state.secrets),
        front_socket=str(state.front_socket),
        eds_dir=str(state.config / envoy.EDS_FOLDER),
        where="local",  # this machine's own llama-server, which serves more routes than the pinned image's
    )
    for name, doc in xds.items():
        out[state.config / envoy.XDS_FOLDER / name] = envoy.dump(doc)
    out[state.config / "envoy.yaml"] = envoy.dump(envoy.bootstrap(plan, xds_dir=str(state.config / envoy.XDS_FOLDER)))
    # Prometheus (rules beside its config) and Alertmanager, as rendered for the gateway host.
    for rel, text in {**prometheus.render(plan), **alertmanager.render(plan)}.items():
        if rel.endswith(".yml") and not rel.endswith("/prometheus.yml"):  # that one is this stack's, below
            out[state.config / Path(rel).parent.name / Path(rel).name] = text
    # Prometheus scrapes the workers with the stack's own worker secret.
    scrape = prometheus.config(plan, worker_key_file=str(state.secrets / KEY_FILE))
    out[state.config / "prometheus" / "prometheus.yml"] = prometheus.HEADER + prometheus.dump(scrape)
    return out


def read_digest(files: dict[Path, str], state: StateDir, program: str) -> str:
    """A digest of the files ``program`` reads at start only (empty for programs that read none of them)."""
    wanted = READ_AT_START.get(program, ())
    h = hashlib.sha256()
    for path in sorted(files):
        rel = path.relative_to(state.config).as_posix()
        if any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in wanted):
            h.update(rel.encode() + b"\0" + files[path].encode() + b"\0")
    return h.hexdigest()[:16] if wanted else ""
