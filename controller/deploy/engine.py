"""One deploy, start to end: lock, bundle, probe, preflight, diff, then (unless `--check`) apply per host.

Exit codes (``Outcome.exit_code``): 0 every host applied or already up to date; 10 some hosts failed and were
rolled back while the others were applied; 4 nothing was changed (a preflight, probe or spec problem, or the
operator said no); 75 another deploy holds the lock.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.atomic import write_file
from controller.backends.client import PULL_TIMEOUT_S
from controller.deploy import audit, bundle, diff
from controller.deploy.ansible import FORKS, Connection, run_playbook, script_doc
from controller.deploy.lock import fleet_lock
from controller.errors import DeployError
from controller.mesh import wireguard
from controller.plan.models import Plan, Worker
from controller.render import envoy
from controller.render.containers import CONFIG_DIR, SECRETS_HOST_DIR, START_PERIOD_S, host_containers
from controller.secrets import KEY_FILE, ensure_worker_secret
from controller.spec import LoadedSpec
from controller.spec.models import Host

EXIT_APPLIED = 0
EXIT_NOTHING_DONE = 4
EXIT_ROLLED_BACK = 10


@dataclass(frozen=True)
class FleetState:
    """The controller's records of one fleet, under ``<state-dir>/fleets/<name>/``."""

    root: Path

    @classmethod
    def of(cls, state_dir: Path, fleet: str) -> FleetState:
        return cls(state_dir / "fleets" / fleet)

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def lock(self) -> Path:
        return self.root / "deploy.lock"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    @property
    def hosts(self) -> Path:
        """The hosts the fleet was last deployed to, as the spec named them: a host dropped from the spec is
        found here, and retired (`_retire`)."""
        return self.root / "hosts.json"

    @property
    def mesh_state(self) -> Path:
        return self.root.parent.parent  # the state folder: `controller mesh` keeps the keys in its mesh/<fleet>/


@dataclass
class Options:
    hosts: list[str] | None = None  # None: every host
    check: bool = False
    yes: bool = False
    wait_s: float = 0
    compose: str | None = None  # the compose command on hosts; None: `podman-compose`, or `docker compose`
    images: dict[str, Path] = field(default_factory=dict)  # project image tag -> archive to load where missing
    drain_s: float = 120  # how long a replica's requests (streams included) may take to finish before it stops
    parallel: int = FORKS  # serving replicas replaced at once (each of another model, on another host)
    conn: Connection = field(default_factory=Connection)


@dataclass
class Outcome:
    fleet: str
    check: bool
    changes: dict[str, diff.HostChanges] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> step, message
    retire: list[str] = field(default_factory=list)  # hosts the spec no longer names, with this fleet's things
    retired: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> what was removed, what was kept
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # What took the time: each step that ran on hosts, in order: {"step", "hosts", "seconds"}.
    steps: list[dict[str, Any]] = field(default_factory=list)

    def timed(self, step: str, hosts: list[str], began: float) -> None:
        self.steps.append({"step": step, "hosts": hosts, "seconds": round(time.monotonic() - began, 2)})

    @property
    def exit_code(self) -> int:
        if self.problems:
            return EXIT_NOTHING_DONE
        if self.failed:
            return EXIT_ROLLED_BACK if self.applied or self.unchanged or self.retired else EXIT_NOTHING_DONE
        return EXIT_APPLIED

    def result(self, host: str) -> str:
        if host in self.failed:
            return "failed"
        if host in self.applied:
            return "applied"
        return "no change" if self.changes[host].empty else "checked"

    def _retire_result(self, host: str) -> dict[str, Any]:
        if host in self.retired:
            return self.retired[host]
        if host in self.failed:
            return {"result": "failed", "failure": self.failed[host]}
        return {"result": "checked" if self.check else "not run"}

    def as_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "check": self.check,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 2),
            "problems": self.problems,
            "steps": self.steps,
            "retire": {h: self._retire_result(h) for h in self.retire},
            "hosts": {
                h: {
                    **c.as_dict(),
                    "result": self.result(h),
                    **({"failure": self.failed[h]} if h in self.failed else {}),
                }
                for h, c in self.changes.items()
            },
        }


Progress = Callable[[str, str], None]  # (host or "", message)


def deploy(loaded: LoadedSpec, plan: Plan, state_dir: Path, opts: Options, progress: Progress) -> Outcome:
    fleet = plan.fleet
    names = [h.name for h in fleet.hosts or []]
    hosts = opts.hosts or names
    unknown = sorted(set(hosts) - set(names))
    if unknown:
        raise DeployError(f"--host {', '.join(unknown)}: no such host in the spec; hosts: {', '.join(names)}")
    state = FleetState.of(state_dir, fleet.name)
    started = time.monotonic()
    outcome = Outcome(fleet.name, opts.check)
    command = "deploy --check" if opts.check else "deploy"
    with fleet_lock(state.lock, fleet.name, command, opts.wait_s) as holder:
        bundles = _bundles(loaded, plan, state)
        progress("", f"probing {len(hosts)} host(s)")
        began = time.monotonic()
        probes = _probe(plan, bundles, hosts, opts)
        outcome.timed("probe", hosts, began)
        for host in hosts:
            problems = diff.preflight(plan, bundles[host], probes[host], _compose(opts, probes[host]))
            outcome.problems += problems
        if outcome.problems:
            _audit(state, loaded, outcome, holder, started)
            return outcome
        for host in hosts:
            outcome.changes[host] = diff.changes(bundles[host], probes[host], _mesh_interface(plan))
            for line in outcome.changes[host].lines():
                progress(host, line)
        outcome.retire = [] if opts.hosts else sorted(set(_deployed_hosts(state)) - set(names))
        for host in outcome.retire:
            progress(host, "no longer in the spec: its containers, files and mesh interface are removed (volumes kept)")
        if opts.check:
            outcome.unchanged = [h for h in hosts if outcome.changes[h].empty]
            outcome.seconds = time.monotonic() - started
            return outcome
        todo = [h for h in hosts if not outcome.changes[h].empty]
        if outcome.retire and not opts.yes:
            raise DeployError(
                f"{', '.join(outcome.retire)}: no longer in the spec, to be retired, and --yes not given: nothing was "
                "changed (review with --check)"
            )
        outcome.unchanged = [h for h in hosts if outcome.changes[h].empty]
        if todo and not opts.yes:
            raise DeployError("changes found and --yes not given: nothing was changed (review with --check)")
        if todo:
            _apply(plan, bundles, probes, todo, outcome, state, opts, progress)
        if outcome.retire:
            _retire(plan, outcome, state, opts, progress)
        _record_hosts(plan, outcome, state, opts)
        outcome.seconds = time.monotonic() - started
        _audit(state, loaded, outcome, holder, started)
    return outcome


def _deployed_hosts(state: FleetState) -> dict[str, dict[str, Any]]:
    try:
        record: dict[str, dict[str, Any]] = json.loads(state.hosts.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise DeployError(f"{state.hosts}: not the JSON deploy writes ({exc}); move it away to deploy") from None
    return record


def _record_hosts(plan: Plan, outcome: Outcome, state: FleetState, opts: Options) -> None:
    """The hosts this fleet now has things on: the spec's that were deployed (or already were), and retired ones
    whose retirement failed (the next deploy tries again)."""
    record = {h: v for h, v in _deployed_hosts(state).items() if h in outcome.retire and h not in outcome.retired}
    record |= {h: v for h, v in _deployed_hosts(state).items() if h in {x.name for x in plan.fleet.hosts or []}}
    for host in plan.fleet.hosts or []:
        if host.name in outcome.applied or host.name in outcome.unchanged or host.name in outcome.failed:
            record[host.name] = host.model_dump(mode="json", exclude_none=True)
    write_file(state.hosts, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o600)


def _retire(plan: Plan, outcome: Outcome, state: FleetState, opts: Options, progress: Progress) -> None:
    """Remove this fleet's containers, files and mesh interface from the hosts the spec dropped; keep volumes."""
    known = _deployed_hosts(state)
    hosts = [Host.model_validate(known[h]) for h in outcome.retire]
    fleet = plan.fleet.model_copy(update={"hosts": hosts})
    variables = {
        "fleet_name": plan.fleet.name,
        "fleet_deploy_dir": bundle.DEPLOY_DIR,
        "fleet_mesh_interface": _mesh_interface(plan) or "",
    }
    results = run_playbook("retire.yml", fleet, outcome.retire, opts.conn, variables)
    for h in outcome.retire:
        r = results[h]
        if not r.ok:
            outcome.failed[h] = {"step": r.failed_task or "?", "message": r.message}
            progress(h, f"FAILED to retire at {r.failed_task}: {r.message}")
            continue
        removed = (r.results.get("the fleet's containers", {}).get("stdout") or "").split("\n")
        kept = [v for v in (r.results.get("the fleet's volumes (kept)", {}).get("stdout") or "").split("\n") if v]
        outcome.retired[h] = {"result": "retired", "containers": [x for x in removed if x], "volumes_kept": kept}
        progress(h, "retired" + (f"; volumes kept: {', '.join(kept)}" if kept else ""))


def _mesh_interface(plan: Plan) -> str | None:
    return plan.fleet.mesh.interface if plan.fleet.mesh.kind == "wireguard" else None


def _compose(opts: Options, probe: dict[str, Any]) -> str:
    if opts.compose:
        return opts.compose
    tools = probe.get("tools", {})
    return "podman-compose" if tools.get("podman-compose") or not tools.get("docker") else "docker compose"


def _bundles(loaded: LoadedSpec, plan: Plan, state: FleetState) -> dict[str, bundle.HostBundle]:
    ensure_worker_secret(state.secrets)
    mesh_keys: dict[str, Path] = {}
    mesh_files: dict[str, str] = {}
    if plan.fleet.mesh.kind == "wireguard":
        public = wireguard.ensure_keys(state.mesh_state, plan.fleet)
        mesh_files = wireguard.mesh_configs(plan.fleet, public)
        for name in list(mesh_files):
            if name.endswith(".conf"):
                mesh_files[name.removesuffix(".conf") + ".sync.conf"] = wireguard.syncconf_text(mesh_files[name])
        mesh_keys = {
            h.name: wireguard.private_key_file(state.mesh_state, plan.fleet.name, h.name)
            for h in plan.fleet.hosts or []
        }
    secrets = bundle.Secrets(state.secrets, mesh_keys)
    return bundle.build(plan, loaded, secrets, mesh_files)


def _probe(
    plan: Plan, bundles: dict[str, bundle.HostBundle], hosts: list[str], opts: Options
) -> dict[str, dict[str, Any]]:
    host_vars = {}
    for host in hosts:
        args = {
            "fleet": plan.fleet.name,
            "paths": sorted({*bundles[host].digests, *bundles[host].required}),
            "manifest": bundle.MANIFEST,
            "interface": _mesh_interface(plan),
            "compose": opts.compose or "podman-compose",
        }
        host_vars[host] = {"fleet_probe_args": base64.b64encode(json.dumps(args).encode()).decode()}
    results = run_playbook("probe.yml", plan.fleet, hosts, opts.conn, {}, host_vars)
    probes: dict[str, dict[str, Any]] = {}
    problems = []
    for host in hosts:
        r = results[host]
        if not r.ok:
            why = "unreachable over SSH" if r.unreachable else f"probe failed ({r.failed_task})"
            problems.append(f"{host}: {why}: {r.message}")
            continue
        try:
            probes[host] = script_doc(str(r.results.get("probe", {}).get("stdout", "")), "the probe")
        except ValueError as exc:
            problems.append(f"{host}: {exc}")
    if problems:
        raise DeployError("preflight failed; nothing was changed anywhere:\n  " + "\n  ".join(problems))
    return probes


def _apply(
    plan: Plan,
    bundles: dict[str, bundle.HostBundle],
    probes: dict[str, dict[str, Any]],
    todo: list[str],
    outcome: Outcome,
    state: FleetState,
    opts: Options,
    progress: Progress,
) -> None:
    """Phase 1, every host at once: files, mesh, images, services that are not workers. Phase 2, the workers:
    those with no requests to drain (new, or the only replica of their model) in waves of one per host, every host
    at once, so a fleet's first deploy takes as long as its busiest host, not the sum of all; then those that serve
    beside another replica, in rolling waves (`rolling_waves`: at most one replica of a model and one worker of a
    host in each, ``opts.parallel`` at most): out of the gateway's rotation (drained), replaced, gated, back in
    rotation, so a model never loses more than one replica at once and a rolling update of the fleet takes about
    as many waves as its most-replicated model has replicas (or its busiest host has workers), not one per
    replica."""
    common = {"fleet_deploy_dir": bundle.DEPLOY_DIR}
    with tempfile.TemporaryDirectory(prefix="fleet-deploy-") as tmp:
        host_vars = {h: _host_vars(plan, bundles[h], probes[h], outcome.changes[h], Path(tmp) / h, opts) for h in todo}
        for h in todo:
            progress(h, "pushing files, mesh, images, services")
        began = time.monotonic()
        results = run_playbook("deploy.yml", plan.fleet, todo, opts.conn, common, host_vars)
        outcome.timed("files, mesh, images, services", todo, began)
    for h in todo:
        r = results[h]
        if not r.ok:
            outcome.failed[h] = {"step": r.failed_task or "?", "message": r.message}
            progress(h, f"FAILED at {r.failed_task}: {r.message}")
    gateway = plan.fleet.gateway.host
    envoy_up = gateway not in outcome.failed and (bool(probes.get(gateway, {}).get("manifest")) or gateway in todo)
    waves: dict[str, list[str]] = {}
    drains: list[tuple[str, str]] = []
    for h in todo:
        c = outcome.changes[h]
        for name in [s for s in c.start + c.restart if s in bundles[h].workers]:
            serving = envoy_up and name in c.restart  # a worker that was not running has no requests to drain
            if serving and len(plan.workers_of(plan.worker(name).model)) > 1:
                drains.append((h, name))
            else:
                waves.setdefault(h, []).append(name)
    while True:
        wave = {h: names.pop(0) for h, names in waves.items() if names and h not in outcome.failed}
        if not wave:
            break
        ran = {h: envoy_up and name in outcome.changes[h].restart for h, name in wave.items()}
        began = time.monotonic()
        _replace_workers(plan, bundles, wave, host_vars, ran, outcome, opts, progress)
        outcome.timed("workers " + ", ".join(wave.values()), list(wave), began)
    for planned in rolling_waves(plan, drains, opts.parallel):
        wave = {h: name for h, name in planned if h not in outcome.failed}
        if wave:
            began = time.monotonic()
            _replace_workers(plan, bundles, wave, host_vars, dict.fromkeys(wave, True), outcome, opts, progress)
            outcome.timed("drain and replace " + ", ".join(wave.values()), list(wave), began)
    for h in todo:
        if h not in outcome.failed:
            outcome.applied.append(h)
            progress(h, "applied")


def rolling_waves(plan: Plan, drains: list[tuple[str, str]], at_once: int) -> list[list[tuple[str, str]]]:
    """The serving replicas to replace (host, worker), in waves that may run at once: no two workers of one model
    in a wave (the others of that model serve meanwhile), no two of one host (a host replaces one worker at a
    time), at most ``at_once`` in all. Greedy in the order given, so each worker goes in the first wave it may
    join: the waves number about the most replicas any model has, or the most workers any host has, whichever
    is more."""
    if at_once < 1:
        raise DeployError(f"--parallel {at_once}: replace at least one replica at a time (1 is one by one)")
    left, waves = list(drains), []
    while left:
        wave: list[tuple[str, str]] = []
        hosts: set[str] = set()
        models: set[str] = set()
        rest = []
        for host, name in left:
            model = plan.worker(name).model
            if len(wave) < at_once and host not in hosts and model not in models:
                wave.append((host, name))
                hosts.add(host)
                models.add(model)
            else:
                rest.append((host, name))
        waves.append(wave)
        left = rest
    return waves


def _replace_workers(
    plan: Plan,
    bundles: dict[str, bundle.HostBundle],
    wave: dict[str, str],
    host_vars: dict[str, dict[str, Any]],
    serving: dict[str, bool],
    outcome: Outcome,
    opts: Options,
    progress: Progress,
) -> None:
    """One worker per host of ``wave``, those hosts at once, each replaced and gated; the workers that serve beside
    another replica of their model (no two of one model in a wave: `rolling_waves`) are drained first, together,
    and put back in rotation after. A host whose worker fails is rolled back (replace.yml) and marked failed; the
    others go on."""
    gateway = plan.fleet.gateway.host
    drained: list[tuple[str, str]] = []
    for host, name in wave.items():
        worker = plan.worker(name)
        others = [w for w in plan.workers_of(worker.model) if w.name != name]
        if serving[host] and others:
            progress(host, f"{name}: out of rotation, draining (up to {opts.drain_s:.0f} s)")
            drained.append((host, name))
        else:
            why = "it was not serving" if not serving[host] else f"{worker.model} has no other replica"
            progress(host, f"{name}: replaced in place ({why})")
    if drained:
        took = _set_rotation(plan, [name for _, name in drained], True, opts)
        for host, name in drained:
            progress(host, f"{name}: drained in {took[name]}")
    for host, name in wave.items():
        if plan.model(plan.worker(name).model).swap is not None:
            progress(host, f"{name}: on demand: created, left stopped until its model is asked for")
        else:
            progress(host, f"{name}: starting, gated on a one-token inference")
    gates = {}
    for host, name in wave.items():
        gate = _worker_gate(plan, name, host_vars[host]["fleet_engine"])
        gate["digest"] = bundles[host].services[name]
        gates[host] = {**host_vars[host], "fleet_worker": gate}
    results = run_playbook(
        "replace.yml", plan.fleet, list(wave), opts.conn, {"fleet_deploy_dir": bundle.DEPLOY_DIR}, gates
    )
    if gateway not in outcome.failed and drained:
        _set_rotation(plan, [name for _, name in drained], False, opts)
        for host, name in drained:
            progress(host, f"{name}: back in rotation")
    for host, name in wave.items():
        result = results[host]
        if not result.ok:
            outcome.failed[host] = {"step": result.failed_task or "?", "message": result.message}
            progress(host, f"FAILED at {result.failed_task}: {result.message}")
            continue
        on_demand = plan.model(plan.worker(name).model).swap is not None
        progress(host, f"{name}: ready, loaded when asked for" if on_demand else f"{name}: serving")


def _set_rotation(plan: Plan, names: list[str], draining: bool, opts: Options) -> dict[str, str]:
    """On the gateway, in one run: each worker's model cluster endpoint file with that worker DRAINING (then wait
    for their requests to finish, bounded) or as rendered; returns how each drain went, for its progress line."""
    workers = [plan.worker(n) for n in names]
    docs = envoy.eds_files(plan, frozenset(names) if draining else frozenset())
    clusters = sorted({envoy.model_cluster(w.model) for w in workers})
    files = [
        {
            "cluster": c,
            "eds": envoy.EDS_HEADER + envoy.dump(docs[f"{c}.yaml"]),
            "path": f"{CONFIG_DIR}/envoy/{envoy.EDS_FOLDER}/{c}.yaml",
        }
        for c in clusters
    ]
    wait = None
    endpoints = [
        {"cluster": envoy.model_cluster(w.model), "address": w.address, "port": w.port, "worker": w.name}
        for w in workers
    ]
    if draining:
        args = {"admin_port": plan.fleet.gateway.ports.envoy_admin, "timeout_s": opts.drain_s, "endpoints": endpoints}
        wait = base64.b64encode(json.dumps(args).encode()).decode()
    gateway = plan.fleet.gateway.host
    variables = {"fleet_eds_files": files, "fleet_drain": wait}
    result = run_playbook("drain.yml", plan.fleet, [gateway], opts.conn, variables)[gateway]
    if not result.ok:
        what = "out of" if draining else "back in"
        raise DeployError(f"{gateway}: could not put {', '.join(names)} {what} rotation: {result.message}")
    if not draining:
        return {}
    lines = dict.fromkeys(names, "an unknown time (the drain printed no report)")
    try:
        report = script_doc(str(result.results.get("wait for the endpoints to drain", {}).get("stdout", "")), "drain")
    except ValueError as exc:
        report = {}
        lines = dict.fromkeys(names, f"an unknown time ({exc})")
    for e in report.get("endpoints", []):
        lines[e["worker"]] = (
            f"{e['seconds']} s"
            if e.get("drained")
            else f"{report.get('seconds')} s, NOT drained: {e.get('active')} request(s) still in flight were cut"
        )
    return lines


def _host_vars(
    plan: Plan,
    b: bundle.HostBundle,
    probe: dict[str, Any],
    c: diff.HostChanges,
    stage: Path,
    opts: Options,
) -> dict[str, Any]:
    stage.mkdir(parents=True)
    staged = False
    for path in c.files_added + c.files_changed:
        f = b.files[path]
        target = stage / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.source is not None:
            shutil.copyfile(f.source, target)
        else:
            target.write_bytes(f.content)
        os.chmod(target, f.mode)
        staged = True
    workers = set(b.workers)
    changed = c.start + c.restart
    services, waits = _start_order(plan, b.host, [s for s in changed if s not in workers])
    previous = probe.get("manifest") or {}
    # Workers are replaced after this run, one at a time; each enters the manifest once it serves.
    deployed = {k: v for k, v in b.services.items() if k not in workers or k not in changed}
    deployed.update({k: v for k, v in previous.get("services", {}).items() if k in workers and k in changed})
    manifest = {
        "fleet": plan.fleet.name,
        "files": b.digests,
        "services": deployed,
        "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": f"{getpass.getuser()}@{socket.gethostname()}",
    }
    mesh = None
    if c.mesh and plan.fleet.mesh.kind == "wireguard":
        iface = plan.fleet.mesh.interface
        prefix = plan.fleet.mesh.subnet.prefixlen if plan.fleet.mesh.subnet else 32
        mesh = {
            "interface": iface,
            "command": wireguard.host_sync_command(iface, f"/etc/fleet/wireguard/{iface}.sync.conf"),
            "address": f"{plan.host(b.host).address}/{prefix}",
        }
    engine = probe.get("engine") or "podman"
    return {
        "fleet_stage": str(stage) if staged else None,
        "fleet_no_log": any(b.files[p].secret for p in c.files_added + c.files_changed),
        "fleet_remove_files": c.files_removed,
        "fleet_dirs": [
            {"path": "/etc/fleet", "mode": "0755"},
            {"path": "/etc/fleet/secrets", "mode": "0700"},
            {"path": "/var/log/fleet", "mode": "0755"},
            {"path": bundle.DEPLOY_DIR, "mode": "0700"},
        ],
        "fleet_mesh": mesh,
        "fleet_images": [
            {"tag": tag, "archive": str(path)} for tag, path in opts.images.items() if tag in _images_of(plan, b.host)
        ],
        "fleet_runtime": b.runtime,
        "fleet_compose": _compose(opts, probe),
        "fleet_engine": engine,
        "fleet_services_start": services,
        "fleet_services_waits": waits,
        "fleet_services_remove": c.remove,
        # Envoy's endpoint files need an inotify instance each; raised before Envoy starts where the host has fewer.
        "fleet_inotify_instances": envoy.inotify_instances(plan) if b.host == plan.fleet.gateway.host else None,
        "fleet_manifest": manifest,
        "fleet_had_manifest": bool(previous),
        "fleet_rollback_services": sorted(set(changed) & set(previous.get("services", {}))),
        "fleet_rollback_remove": sorted(set(changed) - set(previous.get("services", {}))),
    }


def _start_order(plan: Plan, host: str, names: list[str]) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """``names`` in an order where each starts after what it needs (`Container.after`), and for each, the containers
    of this host that must be healthy first (Envoy: the gatekeeper, which publishes the certificate its listener
    reads), with how long each may take. Services start one by one (`compose up --no-deps`), so the role waits for
    those itself, as Compose's `depends_on: condition: service_healthy` would."""
    containers = {c.name: c for c in host_containers(plan, host)}
    order: list[str] = []

    def visit(name: str, seen: frozenset[str]) -> None:
        if name in order or name not in names or name in seen:
            return
        for dep in containers[name].after:
            visit(dep, seen | {name})
        order.append(name)

    for name in names:
        visit(name, frozenset())

    def wait_s(name: str) -> int:
        health = containers[name].health
        return (health.start_period_s if health is not None else 0) + 60

    waits = {n: [{"name": d, "timeout_s": wait_s(d)} for d in containers[n].after if d in containers] for n in order}
    return order, {n: w for n, w in waits.items() if w}


def _images_of(plan: Plan, host: str) -> set[str]:
    return {c.image for c in host_containers(plan, host)}


def _worker_gate(plan: Plan, name: str, engine: str) -> dict[str, Any]:
    """What the role needs to start a worker and prove it serves: a one-token inference on its own address."""
    worker = plan.worker(name)
    address = f"[{worker.address}]" if ":" in worker.address else worker.address
    model = worker.served_names[0]
    body: dict[str, Any]
    task = plan.model(worker.model).task
    if task == "embed":
        url, body = f"http://{address}:{worker.port}/v1/embeddings", {"model": model, "input": "ok"}
    elif task == "rerank":
        url = f"http://{address}:{worker.port}/v1/rerank"
        body = {"model": model, "query": "ok", "documents": ["ok"]}
    else:
        url = f"http://{address}:{worker.port}/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": "ok"}], "max_tokens": 1}
    gate = {
        "container": f"fleet-{name}",
        "engine": engine,
        "url": url,
        "body": body,
        "key_file": f"{SECRETS_HOST_DIR}/{KEY_FILE}",
        "gpus": [g.uuid for g in worker.gpus],
        "timeout_s": START_PERIOD_S[worker.backend],
        "prepare": _prepare(plan, worker, f"http://{address}:{worker.port}"),
    }
    return {
        "name": name,
        "services": [name],
        "gate": base64.b64encode(json.dumps(gate).encode()).decode(),
        # Created, not started: the swap coordinator loads it (through the host agent) when its model is asked for.
        "on_demand": plan.model(worker.model).swap is not None,
    }


def _prepare(plan: Plan, worker: Worker, base: str) -> list[dict[str, Any]]:
    """What makes a worker answer to its model's names before it is gated (as `WorkerClient.ensure_model` does on
    a workstation): an Ollama worker pulls the spec's tag into its volume (once; later pulls only check it) and
    copies it to each served name. The other backends serve what their command line names."""
    model = plan.model(worker.model)
    if worker.backend != "ollama":
        return []
    tag = str(model.source.ollama)
    steps = [
        {
            "url": f"{base}/api/pull",
            "body": {"model": tag, "stream": False},
            "timeout_s": PULL_TIMEOUT_S,
            "what": f"pulling {tag}",
        }
    ]
    for served in model.served_names:
        if served != tag:
            body = {"source": tag, "destination": served}
            steps.append({"url": f"{base}/api/copy", "body": body, "timeout_s": 60, "what": f"naming {tag} {served}"})
    return steps


def _audit(state: FleetState, loaded: LoadedSpec, outcome: Outcome, holder: dict[str, object], started: float) -> None:
    spec_digest = hashlib.sha256(loaded.path.read_bytes()).hexdigest()[:16]
    audit.append(
        state.audit_log,
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "by": f"{holder['user']}@{holder['host']}",
            "spec": str(loaded.path),
            "spec_sha256": spec_digest,
            "check": outcome.check,
            "seconds": round(time.monotonic() - started, 2),
            **outcome.as_dict(),
        },
    )
