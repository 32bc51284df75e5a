"""Envoy: the gateway's L7 router: a bootstrap `<gateway host>/envoy/envoy.yaml` and the listeners, clusters
(`xds/`) and endpoints (`eds/`) it reads from files it watches, so a changed spec needs no restart.

Built as data (plain dicts), dumped with stable order. What it guarantees:

- one cluster per model over all its replicas on all hosts, least-request
  balancing, active health checks, circuit breakers, outlier detection;
- one cluster per worker for `/proxy/{worker}/v1/...`;
- every request is authenticated by the Lua filter (``envoy/model_router.lua``),
  which asks the gatekeeper (cluster `gatekeeper`) and reuses an API key's
  answer for as long as the gatekeeper allows; no answer → 503 (fail closed);
- the model is read from the JSON body by the same filter, which sets
  `x-fleet-model` and re-picks the route; unknown model → 404;
- retries only before the first response byte (reset/connect failure/refused
  stream, once, on another host): after response headers Envoy cannot retry;
- route timeouts off (streams), a stream idle timeout catches stalls;
- only the documented inference routes pass; everything else is a JSON 404;
- edge hardening: path normalization, escaped slashes rejected, header size
  and count limits, request header timeout, buffer limits, admin on loopback.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import PurePosixPath
from typing import Any

from controller import backends
from controller.backends import apis
from controller.plan import slug
from controller.plan.models import Plan, Worker
from controller.render import Files, asset, dump_yaml, renderer
from controller.secrets import SDS_FILE, SDS_NAME

MIB = 1024 * 1024
# Every inference route; which of them a model serves is its backend's (controller/backends/apis.py), checked by the
# Lua filter, which answers the others in that API's own error shape.
INFERENCE_PATHS = apis.ALL
# Largest `n`/`best_of` a request may ask for: each one is a full generation.
MAX_N = 8
# Where Envoy writes the usage log on a gateway host (shared with the gatekeeper).
USAGE_LOG = "/var/log/fleet/usage.log"
LIVE_LOG_NAME = "live.log"  # beside the usage log: the console's requests in flight (controller/console/live.py)
LIVE_FLUSH_S = 1  # how often a running request's line is written there
# Where Envoy finds the certificate it serves on a gateway host: an SDS file the gatekeeper publishes
# (controller/gateway/certs.py).
TLS_DIR = "/etc/fleet/tls"
# Behind Caddy (gateway.front: caddy): the Unix socket Envoy takes Caddy's requests on, in a folder the two share.
FRONT_SOCKET = "/run/fleet/envoy-front.sock"
# Where Envoy finds the worker secret it adds to every request to a worker (controller/secrets.py).
SECRETS_DIR = "/etc/fleet/secrets"
# Requests in flight per replica slot: one running, one waiting in the backend's own queue.
CONNECTIONS_PER_SLOT = 2
GATEKEEPER_CLUSTER = "gatekeeper"
# The caller's credentials never leave the gateway for a worker (which gets the worker secret instead).
CREDENTIALS = ["authorization", "x-api-key", "cookie"]
# How long the Lua filter waits for the gatekeeper before answering 503.
AUTH_TIMEOUT_MS = 2000
# Users whose request rate Envoy keeps at once (one token bucket each, least recently used dropped first: a
# dropped user starts again with a full bucket, so keep it above the number of users active within a minute).
RATE_LIMITED_USERS_MAX = 10_000
# Envoy's local rate limit marks the 429s it makes with this header; the Lua filter turns them into the
# OpenAI error shape with Retry-After, and removes it.
RATE_LIMITED_HEADER = "x-fleet-rate-limited"


@renderer("envoy")
def render(plan: Plan) -> Files:
    host = plan.fleet.gateway.host
    out = {
        f"{host}/envoy/envoy.yaml": "# Rendered by `controller render` from the fleet spec; do not edit.\n"
        + dump(bootstrap(plan, xds_dir=XDS_DIR))
    }
    for name, doc in xds_files(plan, eds_dir=EDS_DIR).items():
        out[f"{host}/envoy/{XDS_FOLDER}/{name}"] = XDS_HEADER + dump(doc)
    for name, doc in eds_files(plan).items():
        out[f"{host}/envoy/{EDS_FOLDER}/{name}"] = EDS_HEADER + dump(doc)
    return out


def dump(doc: dict[str, Any]) -> str:
    return dump_yaml(doc)


# Listeners and clusters, in a folder Envoy watches (LDS and CDS from files): a changed spec (a model, a user's
# limits, a worker) reaches a running Envoy by a rename of these files, without a restart. A changed listener is
# warmed, then takes new connections while the old one drains (requests in flight, streams included, finish on
# it); unchanged listeners and clusters are left as they are. Only the bootstrap (admin port, node) needs a restart.
XDS_FOLDER = "xds"
XDS_DIR = f"/etc/envoy/{XDS_FOLDER}"  # in the Envoy container: /etc/fleet/envoy on the gateway host, mounted
XDS_HEADER = "# Rendered by `controller render` from the fleet spec; do not edit. Envoy reloads it when replaced.\n"
LISTENERS_FILE = "listeners.yaml"
CLUSTERS_FILE = "clusters.yaml"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
# How Envoy runs (container and `controller up`): a replaced listener's connections are asked to close at once
# (HTTP/1.1 `Connection: close` after the response in flight, HTTP/2 GOAWAY) and closed by force only after
# 15 minutes, so a spec change never cuts a stream shorter than that; the usage log reaches the ledger within 1 s.
RUN_ARGS = ["--drain-time-s", "900", "--drain-strategy", "immediate", "--file-flush-interval-msec", "1000"]


def xds_files(
    plan: Plan,
    *,
    usage_log: str = USAGE_LOG,
    tls_dir: str = TLS_DIR,
    secrets_dir: str = SECRETS_DIR,
    front_socket: str = FRONT_SOCKET,
    eds_dir: str | None = None,
    where: apis.Where = "container",
) -> dict[str, dict[str, Any]]:
    """``{file name: LDS or CDS document}`` for a bootstrap made with ``xds_dir``. Write the clusters before the
    listeners (a route may name a new cluster; until that cluster is known Envoy answers 503 for it). ``where``:
    whose routes the models' backends serve (apis.served): the pinned images', or `controller up`'s programs'."""
    listeners = _listeners(plan, usage_log, tls_dir, front_socket, dynamic=True, where=where)
    clusters = _clusters(plan, secrets_dir, eds_dir)
    return {
        CLUSTERS_FILE: {"resources": [{"@type": CLUSTER_TYPE, **c} for c in clusters]},
        LISTENERS_FILE: {"resources": [{"@type": LISTENER_TYPE, **x} for x in listeners]},
    }


# Endpoints of every model and worker cluster, one file per cluster in a folder Envoy watches (EDS from files):
# a file replaced by a rename (deploy, `controller up`) changes the endpoints without a restart, and deploy drains
# a replica before replacing it by marking its endpoint DRAINING there (no new requests; those in flight finish).
EDS_FOLDER = "eds"
EDS_DIR = f"/etc/envoy/{EDS_FOLDER}"  # in the Envoy container: /etc/fleet/envoy on the gateway host, mounted
EDS_HEADER = "# Rendered by `controller render` from the fleet spec; `controller deploy` rewrites it to drain.\n"
CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


# Envoy opens one inotify instance per watched endpoint file (bench.control_plane counted 602 for 601 clusters),
# and Linux allows 128 per user by default (fs.inotify.max_user_instances), for all of that user's processes
# together: past about 45 models of two replicas Envoy aborts at start ("assert failure: inotify_fd_ >= 0").
# What the gateway host needs: Envoy's endpoint files and its own few watches, with the default left for the rest.
INOTIFY_ENVOY_OWN = 8
INOTIFY_OTHERS = 128


def inotify_instances(plan: Plan) -> int:
    """The fs.inotify.max_user_instances the gateway host needs for this plan's Envoy (see INOTIFY_OTHERS)."""
    return len(plan.fleet.models) + len(plan.workers) + INOTIFY_ENVOY_OWN + INOTIFY_OTHERS


def eds_files(plan: Plan, draining: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """``{file name: EDS document}`` for every model and worker cluster; endpoints of the workers named in
    ``draining`` are marked DRAINING in the model clusters (a worker's own cluster, `/proxy/<worker>`, keeps it)."""
    out: dict[str, dict[str, Any]] = {}
    swapper = plan.fleet.gateway.ports.swapper
    for m in plan.fleet.models:
        name = model_cluster(m.name)
        out[f"{name}.yaml"] = _assignment(name, plan.workers_of(m.name), draining, swapper if m.swap else None)
    for w in plan.workers:
        name = worker_cluster(w.name)
        out[f"{name}.yaml"] = _assignment(name, [w], frozenset(), swapper if plan.model(w.model).swap else None)
    return out


def _assignment(
    name: str, workers: list[Worker], draining: frozenset[str], swapper_port: int | None = None
) -> dict[str, Any]:
    """``swapper_port``: the workers are on-demand, and their health is the swap coordinator's answer (see
    `_cluster`), asked on the gateway host's loopback."""
    endpoints: list[dict[str, Any]] = []
    for w in workers:
        inner: dict[str, Any] = {"address": _socket(w.address, w.port)}
        if swapper_port is not None:
            inner["health_check_config"] = {"address": _socket("127.0.0.1", swapper_port)}
        endpoint: dict[str, Any] = {"endpoint": inner}
        if w.name in draining:
            endpoint["health_status"] = "DRAINING"
        endpoints.append(endpoint)
    return {"resources": [{"@type": CLA_TYPE, "cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}]}


def endpoint_address(lb_endpoint: dict[str, Any]) -> tuple[str, int]:
    sa = lb_endpoint["endpoint"]["address"]["socket_address"]
    return str(sa["address"]), int(sa["port_value"])


def set_draining(doc: dict[str, Any], addresses: set[tuple[str, int]], draining: bool) -> bool:
    """In an EDS document (as `eds_files` makes them), set or clear DRAINING on the endpoints at ``addresses``
    (deploy's and `controller up`'s drains, the swap coordinator's evictions); whether anything changed."""
    changed = False
    for cla in doc.get("resources", []):
        for group in cla.get("endpoints", []):
            for e in group.get("lb_endpoints", []):
                if endpoint_address(e) not in addresses:
                    continue
                if draining and e.get("health_status") != "DRAINING":
                    e["health_status"], changed = "DRAINING", True
                elif not draining and "health_status" in e:
                    del e["health_status"]
                    changed = True
    return changed


MODEL_CLUSTER_PREFIX = "model_"


def model_cluster(model: str) -> str:
    return f"{MODEL_CLUSTER_PREFIX}{slug(model)}"


def worker_cluster(worker: str) -> str:
    return f"worker_{worker}"


# On-demand models (`swap`): a request goes to the model's own cluster while its worker is resident, and to the
# swap coordinator (controller/swap/) otherwise, which loads the model and holds the request meanwhile. An
# aggregate cluster does the choosing: its first cluster takes every request while it has a healthy host, the
# next one only when it has none, so a resident model's requests go Envoy → worker with no Python on the path.
SWAPPER_CLUSTER = "swapper"
ONDEMAND_CLUSTER_PREFIX = "ondemand_"
RESIDENT_PATH = "/resident/"  # the coordinator's answer to Envoy's health check of an on-demand worker


def ondemand_cluster(model: str) -> str:
    return f"{ONDEMAND_CLUSTER_PREFIX}{slug(model)}"


def bootstrap(
    plan: Plan,
    *,
    usage_log: str = USAGE_LOG,
    tls_dir: str = TLS_DIR,
    secrets_dir: str = SECRETS_DIR,
    front_socket: str = FRONT_SOCKET,
    eds_dir: str | None = None,
    xds_dir: str | None = None,
    where: apis.Where = "container",
) -> dict[str, Any]:
    """Envoy's bootstrap. With ``xds_dir``, the listeners and clusters are read from the files `xds_files` gives,
    in that folder (watched; the other arguments are `xds_files`'s then); without, they are inline. With
    ``eds_dir``, the model and worker clusters read their endpoints from the files `eds_files` gives, in that
    folder (watched); without, the endpoints are inline (a config that stands alone)."""
    config: dict[str, Any] = {
        "node": {"id": f"fleet-{plan.fleet.name}-gateway", "cluster": f"fleet-{plan.fleet.name}"},
        "admin": {"address": _socket("127.0.0.1", plan.fleet.gateway.ports.envoy_admin)},
    }
    if xds_dir is not None:
        config["dynamic_resources"] = {
            f"{kind}_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": f"{xds_dir}/{name}", "watched_directory": {"path": xds_dir}},
            }
            for kind, name in (("cds", CLUSTERS_FILE), ("lds", LISTENERS_FILE))
        }
    else:
        config["static_resources"] = {
            "listeners": _listeners(plan, usage_log, tls_dir, front_socket, dynamic=False, where=where),
            "clusters": _clusters(plan, secrets_dir, eds_dir),
        }
    return {
        **config,
        "overload_manager": {
            "resource_monitors": [
                {
                    # Bound downstream connections so a flood cannot exhaust memory.
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
    }


def _listeners(
    plan: Plan, usage_log: str, tls_dir: str, front_socket: str, *, dynamic: bool, where: apis.Where
) -> list[dict[str, Any]]:
    gw = plan.fleet.gateway
    public = str(gw.bind) if gw.bind is not None else "0.0.0.0"
    if gw.front == "caddy":  # Caddy serves the public port and asks the gatekeeper; it hands requests over here
        front = listener(plan, "front", front_socket, 0, usage_log, trusted=True, dynamic=dynamic, where=where)
    else:
        front = listener(plan, "public", public, gw.ports.https, usage_log, tls_dir, dynamic=dynamic, where=where)
    return [front, listener(plan, "api", "127.0.0.1", gw.ports.envoy, usage_log, dynamic=dynamic, where=where)]


def _clusters(plan: Plan, secrets_dir: str, eds_dir: str | None) -> list[dict[str, Any]]:
    on_demand = [m for m in plan.fleet.models if m.swap is not None]
    swapper = [_swapper_cluster(plan.fleet.gateway.ports.swapper)] if on_demand else []
    return [
        _gatekeeper_cluster(plan.fleet.gateway.ports.gatekeeper),
        *(_model_cluster(plan, m.name, secrets_dir, eds_dir) for m in plan.fleet.models),
        *(_worker_cluster(plan, w, secrets_dir, eds_dir) for w in plan.workers),
        *swapper,
        *(_ondemand_cluster(m.name, secrets_dir) for m in on_demand),
    ]


def _swapper_cluster(port: int) -> dict[str, Any]:
    """The swap coordinator on the gateway host's loopback: it holds requests for a model that is loading, for as
    long as the load takes, and streams the answer once it is resident. Its 429/503 are answers, not failures:
    nothing retries them."""
    return {
        "name": SWAPPER_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": SWAPPER_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket("127.0.0.1", port)}}]}],
        },
        "per_connection_buffer_limit_bytes": 1 * MIB,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"idle_timeout": "4s"},  # below uvicorn's keep-alive (5 s)
            }
        },
        # Held requests are many and idle: the coordinator's own queue bounds limit them, not these.
        "circuit_breakers": {
            "thresholds": [
                {"priority": "DEFAULT", "max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}
            ]
        },
    }


def _ondemand_cluster(model: str, secrets_dir: str) -> dict[str, Any]:
    """The aggregate of an on-demand model's own cluster and the coordinator's. The router runs the upstream
    filters of the cluster the route names, this one, not those of the cluster that serves: so the worker secret
    is added here too (the coordinator gets it as well, and ignores it: it adds its own)."""
    return {
        "name": ondemand_cluster(model),
        "connect_timeout": "2s",
        "lb_policy": "CLUSTER_PROVIDED",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": worker_credential(secrets_dir),
            }
        },
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": [model_cluster(model), SWAPPER_CLUSTER],
            },
        },
    }


def listener(
    plan: Plan,
    name: str,
    address: str,
    port: int,
    usage_log: str,
    tls_dir: str | None = None,
    *,
    trusted: bool = False,
    dynamic: bool = False,
    where: apis.Where = "container",
) -> dict[str, Any]:
    """One HTTP listener; with ``tls_dir``, TLS with the certificate published there (file SDS).

    The public listener (TLS, the clients' port) and the loopback one (plain
    HTTP, for diagnostics and benchmarks) run the same filters and routes.
    ``trusted``: the listener behind Caddy (``gateway.front: caddy``), on a
    Unix socket only Caddy can open (mode 0600, ``address`` its path), whose
    requests carry the identity Caddy copied from the gatekeeper's answer.
    ``dynamic``: the listener comes from a file Envoy watches (LDS), where a new model's route may arrive
    before its cluster: its routes then do not wait for the clusters they name (503 until they exist).
    """
    gw = plan.fleet.gateway
    body_limit = int(gw.max_body_mib * MIB)
    chain: dict[str, Any] = {}
    if tls_dir is not None:
        chain["transport_socket"] = _downstream_tls(tls_dir)
    return {
        "name": name,
        "address": {"pipe": {"path": address, "mode": 0o600}} if trusted else _socket(address, port),
        # The Lua filter buffers the request body; past this Envoy answers 413.
        "per_connection_buffer_limit_bytes": body_limit,
        "filter_chains": [
            {
                **chain,
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "codec_type": "AUTO",
                            "use_remote_address": True,
                            # No client is "internal", so Envoy always makes its own x-request-id (the ledger's
                            # key: a client that chose its own could have its requests counted once) and strips
                            # internal-only headers. Not an empty list: Envoy 1.40 treats that as "all internal".
                            "internal_address_config": {
                                "cidr_ranges": [{"address_prefix": "255.255.255.255", "prefix_len": 32}]
                            },
                            "always_set_request_id_in_response": True,  # as OpenAI's API: x-request-id on every answer
                            "normalize_path": True,
                            "merge_slashes": True,
                            "path_with_escaped_slashes_action": "REJECT_REQUEST",
                            "max_request_headers_kb": 64,
                            "common_http_protocol_options": {
                                "headers_with_underscores_action": "REJECT_REQUEST",
                                "max_headers_count": 100,
                                "idle_timeout": "3600s",
                            },
                            "http2_protocol_options": {
                                "max_concurrent_streams": 128,
                                "initial_stream_window_size": 65536,
                                "initial_connection_window_size": 1048576,
                            },
                            "request_headers_timeout": f"{gw.request_headers_timeout_s}s",
                            "request_timeout": "0s",  # off: streams may run long
                            "stream_idle_timeout": f"{gw.stream_idle_timeout_s}s",
                            "server_name": "fleet-gateway",
                            # Each request's log lines are written when it ends, and while it runs once a second
                            # (DownstreamPeriodic), for the console's live view; the usage and stdout logs take only
                            # the end (a request is metered once), the live log both.
                            "access_log_options": {"access_log_flush_interval": f"{LIVE_FLUSH_S}s"},
                            "access_log": [
                                _at_end(access_log()),
                                _at_end(usage_log_config(usage_log)),
                                live_log_config(live_log_path(usage_log)),
                            ],
                            "route_config": route_config(plan, validate_clusters=not dynamic),
                            "local_reply_config": local_replies(),
                            "http_filters": [
                                strip_client_headers(trusted),
                                {
                                    "name": "envoy.filters.http.lua",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                        "default_source_code": {"inline_string": lua_source(plan, trusted, where)},
                                    },
                                },
                                usage_from_json(),
                                *user_rate_limit(plan),
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                        "suppress_envoy_headers": True,
                                    },
                                },
                            ],
                        },
                    }
                ],
            }
        ],
    }


def strip_client_headers(trusted: bool = False) -> dict[str, Any]:
    """Every client-sent x-fleet-* and x-envoy-* header removed before anything reads them.

    Natively, by prefix: identity and routing headers are the gatekeeper's and the Lua filter's to set, and
    a client's x-envoy-* control headers (retries, timeouts) must not steer Envoy. (A Lua loop over the
    headers did the same for ~14 µs per request; see bench/envoy_cost.py.) Behind Caddy (``trusted``) the
    x-fleet-* identity headers are the gatekeeper's answer, copied by Caddy after it removed the client's.
    """
    prefixes = ("x-envoy-",) if trusted else ("x-fleet-", "x-envoy-")
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [{"remove_on_match": {"key_matcher": {"prefix": prefix}}} for prefix in prefixes]
            },
        },
    }


def rpm_values(plan: Plan) -> list[int]:
    """Every request rate a user can have: the spec's users' and groups' `rpm` (a user's is one of these)."""
    fleet = plan.fleet
    return sorted(
        {u.rpm for u in fleet.users if u.rpm is not None} | {g.rpm for g in fleet.groups if g.rpm is not None}
    )


def user_rate_limit(plan: Plan) -> list[dict[str, Any]]:
    """Request rates (`rpm`), held in Envoy: one token bucket per user, shared by every worker thread.

    The Lua filter puts the gatekeeper's answer on the request (x-fleet-user, and x-fleet-rpm for a user
    with a rate); this filter, after it, takes one token per request from that user's bucket: up to `rpm`
    at once, refilled continuously at `rpm` a minute, exactly the gatekeeper's former bucket, without a
    round trip. A bucket per distinct rate in the spec, per user (the user's name a wildcard entry: Envoy
    makes a bucket for each name it sees). Requests without x-fleet-rpm (users without a rate, and the
    gatekeeper's own pages) draw from a default bucket too large to refuse anything. No user has a rate:
    no filter.
    """
    rates = rpm_values(plan)
    if not rates:
        return []
    everything = {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"}
    return [
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "user_rpm",
                "token_bucket": everything,
                "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "always_consume_default_token_bucket": False,
                "max_dynamic_descriptors": RATE_LIMITED_USERS_MAX,
                "response_headers_to_add": [{"header": {"key": RATE_LIMITED_HEADER, "value": "1"}}],
                "rate_limits": [
                    {
                        "actions": [
                            {"request_headers": {"header_name": "x-fleet-rpm", "descriptor_key": "rpm"}},
                            {"request_headers": {"header_name": "x-fleet-user", "descriptor_key": "user"}},
                        ]
                    }
                ],
                "descriptors": [
                    {
                        "entries": [{"key": "rpm", "value": str(rpm)}, {"key": "user"}],
                        "token_bucket": {"max_tokens": rpm, "tokens_per_fill": rpm, "fill_interval": "60s"},
                    }
                    for rpm in rates
                ],
            },
        }
    ]


def usage_from_json() -> dict[str, Any]:
    """The usage numbers of a whole JSON response, read natively (streams are read by the Lua filter)."""
    rules = [
        {
            "selectors": [{"key": "usage"}, {"key": field}],
            "on_present": {"metadata_namespace": "fleet", "key": field, "type": "STRING"},
        }
        for field in ("prompt_tokens", "completion_tokens")
    ]
    # Responses and Messages call them input and output tokens (Messages counts the prompt tokens read from or
    # written to the cache apart: the ledger adds them); a rerank answer of vLLM gives only a total.
    rules += [
        {
            "selectors": [{"key": "usage"}, {"key": theirs}],
            "on_present": {"metadata_namespace": "fleet", "key": ours, "type": "STRING"},
        }
        for theirs, ours in (
            ("input_tokens", "prompt_tokens"),
            ("output_tokens", "completion_tokens"),
            ("cache_read_input_tokens", "cache_read_tokens"),
            ("cache_creation_input_tokens", "cache_creation_tokens"),
            ("total_tokens", "total_tokens"),
        )
    ]
    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "response_rules": {
                "rules": rules,
                # Compared whole, parameters included: vLLM sends the first, llama.cpp and Ollama the second.
                "allow_content_types": ["application/json", "application/json; charset=utf-8"],
            },
        },
    }


def _downstream_tls(tls_dir: str) -> dict[str, Any]:
    """TLS 1.2+ with the certificate from ``<tls_dir>/sds.yaml``, reloaded when a new one is moved in."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificate_sds_secret_configs": [
                    {
                        "name": "public",
                        "sds_config": {
                            "path_config_source": {
                                "path": f"{tls_dir}/sds.yaml",
                                "watched_directory": {"path": tls_dir},
                            }
                        },
                    }
                ],
            },
        },
    }


def lua_source(plan: Plan, trusted: bool = False, where: apis.Where = "container") -> str:
    served = [(n, m.name) for m in plan.fleet.models for n in m.served_names]
    models = ", ".join(f"[{_lua_string(n)}] = {_lua_string(c)}" for n, c in sorted(served))
    order = ", ".join(_lua_string(n) for n, _ in served)
    entries = ", ".join(
        f"[{_lua_string(n)}] = {_lua_string(json.dumps(_model_object(n), separators=(',', ':')))}" for n, _ in served
    )
    workers = ", ".join(f"[{_lua_string(w.name)}] = {_lua_string(w.model)}" for w in plan.workers)
    contexts = ", ".join(f"[{_lua_string(m.name)}] = {m.context}" for m in plan.fleet.models)
    served_routes = {m.name: apis.served(m, where) for m in plan.fleet.models}
    routes = ", ".join(
        f"[{_lua_string(name)}] = {{ " + ", ".join(f"[{_lua_string(r)}] = true" for r in served) + " }"
        for name, served in served_routes.items()
    )
    route_lists = ", ".join(
        f"[{_lua_string(name)}] = {_lua_string(', '.join(served) or 'no inference route')}"
        for name, served in served_routes.items()
    )
    config = (
        "FLEET = {\n"
        f"  models = {{ {models} }},\n"
        f"  model_order = {{ {order} }},\n"
        f"  model_json = {{ {entries} }},\n"
        f"  workers = {{ {workers} }},\n"
        f"  context = {{ {contexts} }},\n"
        f"  routes = {{ {routes} }},\n"
        f"  route_list = {{ {route_lists} }},\n"
        f"  max_tokens = {plan.fleet.gateway.max_request_tokens},\n"
        f"  max_n = {MAX_N},\n"
        f"  gatekeeper = {_lua_string(GATEKEEPER_CLUSTER)},\n"
        f"  auth_timeout_ms = {AUTH_TIMEOUT_MS},\n"
        f"  revocation_delay_ms = {plan.fleet.auth.revocation_delay_s * 1000},\n"
        f"  trusted = {'true' if trusted else 'false'},\n"
        f"  rate_limited = {_lua_string(RATE_LIMITED_HEADER)},\n"
        "}\n"
    )
    return config + asset("envoy", "model_router.lua").read_text(encoding="utf-8")


def _lua_string(text: str) -> str:
    """A Lua string literal; every byte beyond plain characters as a decimal escape."""
    plain = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/ -")
    return '"' + "".join(chr(b) if b in plain else f"\\{b:03d}" for b in text.encode()) + '"'


def route_config(plan: Plan, validate_clusters: bool = True) -> dict[str, Any]:
    # GET /v1/models and /v1/models/{name} are answered by the Lua filter, per caller.
    routes: list[dict[str, Any]] = []
    inference = "^(" + "|".join(re.escape(p) for p in INFERENCE_PATHS) + ")$"
    for model in plan.fleet.models:
        for name in model.served_names:
            routes.append(
                {
                    "name": f"model:{name}",
                    "match": {
                        "safe_regex": {"regex": inference},
                        "headers": [_method("POST"), {"name": "x-fleet-model", "string_match": {"exact": name}}],
                    },
                    "route": _upstream(ondemand_cluster(model.name) if model.swap else model_cluster(model.name)),
                    "request_headers_to_remove": CREDENTIALS,
                }
            )
    for worker in plan.workers:
        prefix = f"/proxy/{worker.name}"
        allowed = "^" + re.escape(prefix) + "(" + "|".join(re.escape(p) for p in INFERENCE_PATHS) + ")$"
        routes.append(
            {
                "name": f"proxy:{worker.name}",
                "match": {"safe_regex": {"regex": allowed}, "headers": [_method("POST"), _has_model()]},
                "route": {
                    **_upstream(worker_cluster(worker.name), retries=False),
                    "regex_rewrite": {"pattern": {"regex": "^" + re.escape(prefix)}, "substitution": ""},
                },
                "request_headers_to_remove": CREDENTIALS,
            }
        )
        routes.append(
            {
                "name": f"proxy-models:{worker.name}",
                "match": {"path": f"{prefix}/v1/models", "headers": [_method("GET")]},
                "route": {**_upstream(worker_cluster(worker.name), retries=False), "prefix_rewrite": "/v1/models"},
                "request_headers_to_remove": CREDENTIALS,
            }
        )
    # Browser sign-in (OIDC) and the gatekeeper's own pages; its decision endpoints are Envoy's alone.
    for internal in ("/auth/check", "/auth/reserve", "/auth/sync"):
        routes.append(_direct({"path": internal}, 404, _error_json("Not found", "invalid_request_error", "not_found")))
    # The operator console: the gatekeeper decides who may see it (controller/console/); its event stream runs on.
    routes.append(
        {
            "name": "console",
            "match": {"path_separated_prefix": "/console"},
            "route": {"cluster": GATEKEEPER_CLUSTER, "timeout": "0s"},
        }
    )
    routes.append(
        {
            "name": "gatekeeper-pages",
            "match": {"prefix": "/auth/"},
            "route": {"cluster": GATEKEEPER_CLUSTER, "timeout": "10s"},
        }
    )
    routes.append(
        _direct(
            {"prefix": "/"},
            404,
            _error_json(
                "Unknown API route; this gateway serves " + ", ".join(INFERENCE_PATHS) + " and /v1/models",
                "invalid_request_error",
                "not_found",
            ),
        )
    )
    return {
        "name": "api",
        "virtual_hosts": [{"name": "api", "domains": ["*"], "routes": routes}],
        **({} if validate_clusters else {"validate_clusters": False}),
        # Identity and routing headers reach workers only as the gatekeeper and the Lua filter set them.
        "request_headers_to_remove": ["x-fleet-api-key"],
    }


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fleet"}


def _direct(match: dict[str, Any], status: int, body: str) -> dict[str, Any]:
    return {
        "match": match,
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }


def _method(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}


def _has_model() -> dict[str, Any]:
    return {"name": "x-fleet-model", "present_match": True}


def _upstream(cluster: str, retries: bool = True) -> dict[str, Any]:
    route: dict[str, Any] = {
        "cluster": cluster,
        "timeout": "0s",  # streams run as long as they produce bytes; the idle timeout catches stalls
    }
    if retries:
        route["retry_policy"] = {
            # All three happen before any response byte reached the client;
            # after the first byte Envoy cannot and does not retry.
            "retry_on": "connect-failure,refused-stream,reset",
            "num_retries": 1,
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            # Least-request balancing picks two hosts at random and takes the one with fewer requests in flight:
            # with two replicas, a dead one (no requests in flight) wins 3 times in 4, so 5 re-picks still landed
            # the retry on it about 1 time in 4 (a 503 seen in CI while a replica was killed under load). 50
            # re-picks (an in-memory choice, no I/O) leave it one in a million.
            "host_selection_retry_max_attempts": 50,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        }
    return route


def _model_cluster(plan: Plan, model: str, secrets_dir: str, eds_dir: str | None) -> dict[str, Any]:
    workers = plan.workers_of(model)
    spec = plan.model(model)
    swapper = plan.fleet.gateway.ports.swapper if spec.swap else None
    return _cluster(model_cluster(model), workers, spec.parallel, secrets_dir, eds_dir, swapper)


def _worker_cluster(plan: Plan, worker: Worker, secrets_dir: str, eds_dir: str | None) -> dict[str, Any]:
    spec = plan.model(worker.model)
    swapper = plan.fleet.gateway.ports.swapper if spec.swap else None
    return _cluster(worker_cluster(worker.name), [worker], spec.parallel, secrets_dir, eds_dir, swapper)


def worker_credential(secrets_dir: str) -> list[dict[str, Any]]:
    """The cluster's upstream filters: the worker secret as `Authorization`, then the codec.

    Upstream, so it runs after the route has removed the client's credentials, on every attempt (retries
    included). The secret comes from a file-SDS document (controller/secrets.py), never from this config;
    health checks need none (the backends' health routes are open).
    """
    return [
        {
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                "overwrite": True,
                "credential": {
                    "name": "envoy.http.injected_credentials.generic",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                        "credential": {
                            "name": SDS_NAME,
                            "sds_config": {
                                "path_config_source": {
                                    "path": f"{secrets_dir}/{SDS_FILE}",
                                    "watched_directory": {"path": secrets_dir},
                                }
                            },
                        },
                        "header": "Authorization",
                    },
                },
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def _cluster(
    name: str,
    workers: list[Worker],
    slots: int,
    secrets_dir: str,
    eds_dir: str | None,
    swapper_port: int | None = None,
) -> dict[str, Any]:
    """A health-checked cluster over ``workers``, each serving ``slots`` requests at once.

    An on-demand worker (``swapper_port``, one worker) is health-checked by asking the swap coordinator
    (`/resident/<worker>` on the gateway's loopback, every second, one answer decides): healthy only while it is
    resident and not being evicted. So Envoy stops sending it requests before it is unloaded (a sleeping vLLM
    would die serving one), and sends them again within a second of its load.

    Circuit breakers: each replica gets at most CONNECTIONS_PER_SLOT × slots
    connections (what its HTTP server is sized for, see the llama.cpp
    adapter's http threads), and the cluster admits that many requests in
    flight plus as many queued; beyond that Envoy answers 503 "overloaded" at
    once instead of piling work onto the replicas. Overflow is not a host
    failure, so it never ejects a host.
    """
    backend = backends.get(workers[0].backend)
    per_host = CONNECTIONS_PER_SLOT * slots
    endpoints: dict[str, Any]
    if eds_dir is not None:  # every worker address is an IP address (the spec's host addresses are)
        source = {"path_config_source": {"path": f"{eds_dir}/{name}.yaml", "watched_directory": {"path": eds_dir}}}
        endpoints = {
            "type": "EDS",
            "eds_cluster_config": {"service_name": name, "eds_config": {"resource_api_version": "V3", **source}},
        }
    else:
        endpoints = {
            "type": "STATIC" if all(_is_ip(w.address) for w in workers) else "STRICT_DNS",
            "load_assignment": {
                k: v
                for k, v in _assignment(name, workers, frozenset(), swapper_port)["resources"][0].items()
                if k != "@type"
            },
        }
    return {
        "name": name,
        **endpoints,
        "connect_timeout": "2s",
        # A host whose link is cut answers nothing, not even a reset (a blackhole), so a request on an open
        # upstream connection would wait for ever. Two kernel timers turn that silence into a connection
        # error, which the route retries on another replica (retry_on "reset": nothing reached the client yet):
        # - TCP_USER_TIMEOUT (IPPROTO_TCP 6, option 18), 5 s: a request written and not acknowledged for 5 s;
        # - TCP keepalive, 10 s idle then a probe every 2 s: a request sent and acknowledged whose answer never
        #   comes (a non-streaming generation sends nothing until it is done). With TCP_USER_TIMEOUT set the
        #   kernel gives up once a probe is unanswered past the user timeout: about 12 s after the host's last
        #   packet. A live host's kernel acknowledges the probes, so a long generation is never cut (unlike
        #   per_try_timeout, not used for that reason). A stream that already sent bytes cannot be retried:
        #   the client gets its error (as for any upstream failure after the first byte).
        # Health-check connections get the same options.
        "upstream_bind_config": {
            "socket_options": [
                {
                    "description": "TCP_USER_TIMEOUT",
                    "level": 6,
                    "name": 18,
                    "int_value": 5000,
                    "state": "STATE_PREBIND",
                }
            ]
        },
        "upstream_connection_options": {
            "tcp_keepalive": {"keepalive_time": 10, "keepalive_interval": 2, "keepalive_probes": 3}
        },
        "lb_policy": "LEAST_REQUEST",
        "per_connection_buffer_limit_bytes": 1 * MIB,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                # Below the backends' own keep-alive (llama.cpp and uvicorn close idle connections after
                # 5 s), so Envoy never reuses a connection the worker is closing.
                "common_http_protocol_options": {"idle_timeout": "4s"},
                "http_filters": worker_credential(secrets_dir),
            }
        },
        "health_checks": [
            {
                "timeout": "2s",
                "interval": "5s",
                "no_traffic_interval": "5s",
                "unhealthy_interval": "2s",
                "interval_jitter": "0.5s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "http_health_check": {"path": backend.health_path},
            }
            if swapper_port is None
            else {
                "timeout": "1s",
                "interval": "1s",
                "no_traffic_interval": "1s",
                "unhealthy_interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": f"{RESIDENT_PATH}{workers[0].name}"},
            }
        ],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},  # never send to known-bad hosts
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": per_host * len(workers),
                    "max_pending_requests": per_host * len(workers),
                    "max_requests": per_host * len(workers),
                    "max_retries": max(3, per_host),
                }
            ],
            "per_host_thresholds": [{"priority": "DEFAULT", "max_connections": per_host}],
        },
        "outlier_detection": {
            # Local-origin failures (connect refused, reset) count apart from
            # HTTP 5xx; circuit-breaker overflow is not a host failure.
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "consecutive_gateway_failure": 3,
            "consecutive_5xx": 5,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_time": "120s",
            "max_ejection_percent": 100,
            "enforcing_consecutive_local_origin_failure": 100,
        },
        "ignore_health_on_host_removal": True,
    }


def _gatekeeper_cluster(port: int) -> dict[str, Any]:
    """The gatekeeper on the gateway host's loopback, asked by the Lua filter.

    No retries and no health checks: a failed or slow answer is a 503 for
    that request (fail closed), and the next request asks again.
    """
    return {
        "name": GATEKEEPER_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": GATEKEEPER_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket("127.0.0.1", port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"idle_timeout": "4s"},  # under uvicorn's 5 s keep-alive
            }
        },
        "circuit_breakers": {
            "thresholds": [
                {"priority": "DEFAULT", "max_connections": 256, "max_pending_requests": 1024, "max_requests": 1024}
            ]
        },
    }


def access_log() -> dict[str, Any]:
    """One line per request on stdout (but successful inference requests, in the usage log instead): who, which
    model, where it went, and Envoy's response flags."""
    fields = {
        "time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "model": "%REQ(X-FLEET-MODEL)%",
        "user": "%REQ(X-FLEET-USER)%",
        "app": "%REQ(X-FLEET-APP)%",
        "upstream": "%UPSTREAM_HOST%",
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        "ms": "%DURATION%",
        "ttfb_ms": "%RESPONSE_DURATION%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "prompt_tokens": "%DYNAMIC_METADATA(fleet:prompt_tokens)%",
        "completion_tokens": "%DYNAMIC_METADATA(fleet:completion_tokens)%",
    }
    return {
        "name": "envoy.access_loggers.stdout",
        # Successful inference requests are in the usage log already (user, model, status, tokens, time);
        # here: everything else, and every failure with Envoy's flags and the upstream it tried.
        "filter": {
            "or_filter": {
                "filters": [
                    {
                        "status_code_filter": {
                            "comparison": {
                                "op": "GE",
                                "value": {"default_value": 400, "runtime_key": "fleet.log_status"},
                            }
                        }
                    },
                    {  # not routed to a model (the Lua filter sets x-fleet-model when it routes): not in the usage log
                        "header_filter": {
                            "header": {"name": "x-fleet-model", "present_match": True, "invert_match": True}
                        }
                    },
                ]
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": fields},
        },
    }


def _at_end(logger: dict[str, Any]) -> dict[str, Any]:
    """``logger`` writing only the line of a request's end, not the periodic ones of a request still running."""
    at_end = {"log_type_filter": {"types": ["DownstreamEnd"]}}
    own = logger.get("filter")
    return {**logger, "filter": at_end if own is None else {"and_filter": {"filters": [at_end, own]}}}


def live_log_path(usage_log: str) -> str:
    return str(PurePosixPath(usage_log).with_name(LIVE_LOG_NAME))


# Who sent an inference request and for which model, in both request logs (the gatekeeper's identity headers).
REQUEST_WHO = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "user": "%REQ(X-FLEET-USER)%",
    "key_id": "%REQ(X-FLEET-KEY-ID)%",
    "app": "%REQ(X-FLEET-APP)%",
    "model": "%DYNAMIC_METADATA(fleet:model)%",
}


# A request's end reaches the live log only if it ran this long: the first periodic line comes after the flush
# interval (1 s), and a request that never had one was never shown in flight (a margin for the timer's jitter).
LIVE_END_MIN_MS = 900


def live_log_config(path: str) -> dict[str, Any]:
    """The console's live view of inference requests (controller/console/live.py): one line per second while a
    request runs, and one when it ends if it ran long enough to have had one (`LIVE_END_MIN_MS`): who, which app
    and model, where it went, how long so far, when the first byte came back and the stream events counted so far
    (the Lua filter's). A shorter request is seen ending in the usage log, which has a line for every one: an end
    line here too would cost Envoy a second formatted line per request for nothing."""
    fields = {
        "type": "%ACCESS_LOG_TYPE%",
        "time": "%START_TIME(%s.%3f)%",
        **REQUEST_WHO,
        "upstream": "%UPSTREAM_HOST%",
        "ms": "%DURATION%",
        "ttfb_ms": "%RESPONSE_DURATION%",
        "stream": "%DYNAMIC_METADATA(fleet:stream)%",
        "events": "%DYNAMIC_METADATA(fleet:events)%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "prompt_tokens": "%DYNAMIC_METADATA(fleet:prompt_tokens)%",
        "completion_tokens": "%DYNAMIC_METADATA(fleet:completion_tokens)%",
    }
    routed = {
        "metadata_filter": {
            "matcher": {"filter": "fleet", "path": [{"key": "model"}], "value": {"present_match": True}},
            "match_if_key_not_found": False,
        }
    }
    ended_long = {
        "and_filter": {
            "filters": [
                {"log_type_filter": {"types": ["DownstreamEnd"]}},
                {
                    "duration_filter": {
                        "comparison": {
                            "op": "GE",
                            "value": {"default_value": LIVE_END_MIN_MS, "runtime_key": "fleet.live_end_min_ms"},
                        }
                    }
                },
            ]
        }
    }
    when = {"or_filter": {"filters": [{"log_type_filter": {"types": ["DownstreamPeriodic"]}}, ended_long]}}
    return {
        "name": "envoy.access_loggers.file",
        "filter": {"and_filter": {"filters": [when, routed]}},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": fields},
        },
    }


def usage_log_config(path: str) -> dict[str, Any]:
    """The usage ledger's source: one JSON line per inference request, in a file.

    Envoy writes it whether or not the gatekeeper is up; the gatekeeper reads
    it from a saved offset, so no accepted request's usage is lost to a
    gatekeeper restart. The numbers are the backend's own `usage`, seen in
    passing by the Lua filter; where they never came, the ledger estimates
    them from the rest of the line.
    """
    fields = {
        "time": "%START_TIME(%s.%3f)%",
        **REQUEST_WHO,
        "status": "%RESPONSE_CODE%",
        "prompt_tokens": "%DYNAMIC_METADATA(fleet:prompt_tokens)%",
        "completion_tokens": "%DYNAMIC_METADATA(fleet:completion_tokens)%",
        "total_tokens": "%DYNAMIC_METADATA(fleet:total_tokens)%",  # all a rerank answer of vLLM counts
        # A whole Messages answer's prompt tokens read from and written to the cache, beside its input_tokens.
        "cache_read_tokens": "%DYNAMIC_METADATA(fleet:cache_read_tokens)%",
        "cache_creation_tokens": "%DYNAMIC_METADATA(fleet:cache_creation_tokens)%",
        "ms": "%DURATION%",
        "ttfb_ms": "%RESPONSE_DURATION%",  # for the console's recently ended requests (controller/console/live.py)
        # For a request whose backend numbers never came (see controller.gateway.ledger.metered): whether it
        # reached a backend, how it ended, and the bounds the gateway knows.
        "upstream": "%UPSTREAM_HOST%",
        "flags": "%RESPONSE_FLAGS%",
        "stream": "%DYNAMIC_METADATA(fleet:stream)%",
        "seen_tokens": "%DYNAMIC_METADATA(fleet:seen_tokens)%",
        "bytes_in": "%BYTES_RECEIVED%",
        "completion_cap": "%DYNAMIC_METADATA(fleet:completion_cap)%",
        # A user with a daily quota: the lease the request was admitted under, and the bound it spent from it.
        "lease": "%DYNAMIC_METADATA(fleet:lease)%",
        "reserved": "%DYNAMIC_METADATA(fleet:reserved)%",
    }
    return {
        "name": "envoy.access_loggers.file",
        "filter": {
            "metadata_filter": {
                "matcher": {"filter": "fleet", "path": [{"key": "model"}], "value": {"present_match": True}},
                "match_if_key_not_found": False,  # requests the Lua filter did not route are not usage
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": fields},
        },
    }


# The paths whose errors take Anthropic's shape: its routes, directly or through /proxy/{worker} (query included).
ANTHROPIC_PATHS = r"^(/proxy/[^/?]+)?(" + "|".join(re.escape(p) for p in apis.ANTHROPIC) + r")([?].*)?$"


def local_replies() -> dict[str, Any]:
    """Envoy's own error replies in the OpenAI error shape, in Anthropic's on its routes."""
    payload_too_large = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 413, "runtime_key": "fleet.payload_too_large"}}
        }
    }
    cases: list[tuple[dict[str, Any], int | None, int, str, str]] = [
        (
            _flags("UH", "NR"),
            503,
            503,
            "no healthy upstream: every replica of this model is down",
            "no_healthy_upstream",
        ),
        (_flags("UO"), 503, 503, "the model is at capacity (circuit breaker open); retry shortly", "overloaded"),
        (
            _flags("UF", "URX", "UC", "LR"),
            503,
            503,
            "the model server failed before answering; retry shortly",
            "upstream_failure",
        ),
        (
            _flags("UT", "SI"),
            504,
            504,
            "the model server stopped sending data (stream idle timeout)",
            "upstream_timeout",
        ),
        (_flags("DPE"), 400, 400, "malformed HTTP request", "bad_request"),
        (payload_too_large, None, 413, "request body too large", "payload_too_large"),
    ]
    anthropic_route = {
        "header_filter": {"header": {"name": ":path", "string_match": {"safe_regex": {"regex": ANTHROPIC_PATHS}}}}
    }
    mappers: list[dict[str, Any]] = []
    for when, status, shown, message, code in cases:  # each case in Anthropic's shape first: the first match wins
        anthropic = apis.anthropic_error(shown, message)
        kind = "server_error" if shown >= 500 else "invalid_request_error"
        openai = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        for match, body in (({"and_filter": {"filters": [when, anthropic_route]}}, anthropic), (when, openai)):
            mapper: dict[str, Any] = {
                "filter": match,
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            }
            if status is not None:
                mapper["status_code"] = status
            mappers.append(mapper)
    return {"mappers": mappers}


def _flags(*flags: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": list(flags)}}


def _error_json(message: str, err_type: str, code: str) -> str:
    return json.dumps(
        {"error": {"message": message, "type": err_type, "param": None, "code": code}}, separators=(",", ":")
    )


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
