"""Checks of swap groups and on-demand models (`swap_groups`, `models[].swap`) that need the whole spec.

A swap group is GPUs of one host that its models share, more of them than fit at once. Each of its models has
one replica (the swap coordinator makes that one resident when asked for), runs on a GPU and is placed by the
group (no `placement` of its own).
"""

from __future__ import annotations

from collections.abc import Callable

from controller.errors import Problem
from controller.spec.models import Fleet, Host, SwapGroup

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]


def check(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    from controller.spec.refs import gpu_index  # refs imports this module

    out: list[Problem] = []
    hosts = {h.name: h for h in fleet.hosts or []}
    groups: dict[str, SwapGroup] = {}
    for gi, group in enumerate(fleet.swap_groups):
        at: tuple[str | int, ...] = ("swap_groups", gi)
        if group.name in groups:
            out.append(problem((*at, "name"), f"swap group {group.name}: defined twice; give each group its own name"))
            continue
        groups[group.name] = group
        host = hosts.get(group.host)
        if host is None:
            known = ", ".join(sorted(hosts)) or "none"
            out.append(problem((*at, "host"), f"swap group {group.name}: unknown host {group.host!r}; known: {known}"))
            continue
        if group.cpu_slots is not None:
            if group.gpus is not None:
                out.append(
                    problem((*at, "gpus"), f"swap group {group.name}: a group of CPU slots (cpu_slots) has no gpus")
                )
            if group.cpu_slots > host.cpu_workers:
                out.append(
                    problem(
                        (*at, "cpu_slots"),
                        f"swap group {group.name}: {group.cpu_slots} cpu_slots but host {host.name} has "
                        f"{host.cpu_workers} cpu_workers; raise the host's cpu_workers",
                    )
                )
        elif not host.gpus:
            out.append(
                problem(
                    (*at, "host"),
                    f"swap group {group.name}: host {host.name} has no GPUs; list them under the host's gpus, or "
                    "give the group cpu_slots for CPU models",
                )
            )
            continue
        for ri, ref in enumerate(group.gpus or []):
            if gpu_index(host, ref) is None:
                known = ", ".join(f"{i} ({g.uuid})" for i, g in enumerate(host.gpus))
                out.append(
                    problem(
                        (*at, "gpus", ri),
                        f"swap group {group.name}: host {host.name} has no GPU {ref!r}; its GPUs: {known}",
                    )
                )
        if not any(m.swap is not None and m.swap.group == group.name for m in fleet.models):
            out.append(
                problem(
                    (*at, "name"),
                    f"swap group {group.name}: no model names it; set `swap: {{group: {group.name}}}` on a model or "
                    "remove the group",
                )
            )
    shared: dict[tuple[str, int], str] = {}
    for gi, group in enumerate(fleet.swap_groups):
        host = hosts.get(group.host)
        if host is None or groups.get(group.name) is not group:
            continue
        for index in group_gpus(host, group):
            other = shared.setdefault((host.name, index), group.name)
            if other != group.name:
                out.append(
                    problem(
                        ("swap_groups", gi, "gpus"),
                        f"swap group {group.name}: GPU {index} of host {host.name} is already in swap group {other}; "
                        "a GPU belongs to one group",
                    )
                )
    for mi, model in enumerate(fleet.models):
        if model.swap is None:
            continue
        at = ("models", mi, "swap")
        name = model.name
        if model.swap.group not in groups:
            known = ", ".join(sorted(groups)) or "none (add `swap_groups`)"
            out.append(
                problem((*at, "group"), f"model {name}: unknown swap group {model.swap.group!r}; known: {known}")
            )
        if model.replicas != 1:
            out.append(
                problem(
                    ("models", mi, "replicas"),
                    f"model {name}: an on-demand model has one replica (the one the swap group loads); "
                    f"set replicas: 1 or remove `swap`",
                )
            )
        own = groups.get(model.swap.group)
        if own is not None and (model.device == "cpu") != (own.cpu_slots is not None):
            kind = "CPU slots (cpu_slots)" if own.cpu_slots is not None else "GPUs"
            out.append(
                problem(
                    ("models", mi, "device"),
                    f"model {name}: device {model.device} but swap group {own.name} shares {kind}; use a group "
                    "of the model's kind",
                )
            )
        if model.placement:
            out.append(
                problem(
                    ("models", mi, "placement"),
                    f"model {name}: an on-demand model goes on its swap group's GPUs; remove `placement` "
                    "(or set the group's gpus)",
                )
            )
        host = hosts.get(own.host) if own is not None else None
        if host is not None and host.runtime == "quadlet":
            out.append(
                problem(
                    ("models", mi, "swap"),
                    f"model {name}: on-demand models need runtime compose on host {host.name} for now (a Quadlet "
                    "unit restarts a stopped container, and removes it); set the host's runtime: compose",
                )
            )
        if (
            own is not None
            and host is not None
            and own.cpu_slots is None
            and model.gpus_per_replica > len(group_gpus(host, own))
        ):
            out.append(
                problem(
                    ("models", mi, "gpus_per_replica"),
                    f"model {name}: a replica spans {model.gpus_per_replica} GPUs but swap group {own.name} has "
                    f"{len(group_gpus(host, own))}",
                )
            )
        if model.swap.unload is not None and model.backend != "vllm":
            out.append(
                problem(
                    (*at, "unload"),
                    f"model {name}: only a vLLM model chooses how it unloads (sleep or stop); "
                    + ("a llama.cpp worker is stopped" if model.backend == "llamacpp" else "Ollama frees its model")
                    + "; remove `unload`",
                )
            )
        if model.swap.resident == "always" and model.swap.ttl is not None:
            out.append(
                problem((*at, "ttl"), f"model {name}: resident: always is never unloaded, so a ttl cannot apply")
            )
    return out


def group_gpus(host: Host, group: SwapGroup) -> list[int]:
    """The indices of the group's GPUs on its host, in index order (all of the host's when it names none)."""
    from controller.spec.refs import gpu_index

    if group.cpu_slots is not None:
        return []
    if group.gpus is None:
        return list(range(len(host.gpus)))
    found = {gpu_index(host, ref) for ref in group.gpus}
    return sorted(i for i in found if i is not None)
