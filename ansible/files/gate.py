#!/usr/bin/env python3
"""Gate one worker after it was (re)started: it must answer a real one-token inference, run on its planned GPUs,
and not die trying. Run on the host by Ansible's `script` module (role fleet_host, worker.yml), standard library only.

Argument: base64 JSON {"container", "engine", "url", "body", "key_file", "gpus", "timeout_s", "prepare"}.
"prepare": requests that make the worker serve its model, [{"url", "body", "timeout_s", "what"}] (Ollama:
pull the model, copy it to the spec's names), made first, each until it answers 200. Then polls until the
inference answers 200 (then checks the GPUs the container was given). Fails at once, with the container's last
log lines, when it has exited or restarted twice, or when a step's bound passes. Exit 0: the worker serves.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request


def state(engine: str, container: str) -> tuple[str, int]:
    p = subprocess.run(
        [engine, "inspect", container, "--format", "{{.State.Status}} {{.RestartCount}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if p.returncode != 0:
        return "missing", 0
    status, _, restarts = p.stdout.strip().partition(" ")
    return status, int(restarts or 0)


def logs(engine: str, container: str) -> str:
    p = subprocess.run([engine, "logs", "--tail", "20", container], capture_output=True, text=True, timeout=30)
    return " | ".join((p.stdout + p.stderr).strip().splitlines()[-20:])


def visible_gpus(engine: str, container: str) -> list[str]:
    """The GPUs the container was given: NVIDIA_VISIBLE_DEVICES where the CDI spec sets it, else the CDI devices
    (nvidia.com/gpu=...) it was created with."""
    p = subprocess.run(
        [engine, "inspect", container, "--format", "{{json .Config.Env}} {{json .Config.CreateCommand}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if p.returncode != 0:
        fail(f"{engine} inspect {container}: {p.stderr.strip()[-300:]}")
    env_text, _, create_text = p.stdout.strip().partition(" ")
    for item in json.loads(env_text) or []:
        if item.startswith("NVIDIA_VISIBLE_DEVICES="):
            return sorted(x for x in item.split("=", 1)[1].split(",") if x)
    create = json.loads(create_text or "null") or []
    devices = [create[i + 1] for i, arg in enumerate(create[:-1]) if arg == "--device"]
    devices += [arg.split("=", 1)[1] for arg in create if arg.startswith("--device=")]
    return sorted(d.split("=", 1)[1] for d in devices if d.startswith("nvidia.com/gpu="))


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)


def until_ok(a: dict, key: str, url: str, body: dict, timeout_s: float, what: str, each_s: float = 30) -> None:
    """POST ``body`` to ``url`` (each try bounded by ``each_s``) until it answers 200, failing at once when the
    container dies, or at the bound."""
    data = json.dumps(body).encode()
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        status, restarts = state(a["engine"], a["container"])
        if status in ("exited", "dead", "missing") or restarts >= 2:
            fail(
                f"{a['container']} is {status} (restarted {restarts} times); last log lines: {logs(a['engine'], a['container'])}"
            )
        request = urllib.request.Request(
            url, data, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=each_s) as reply:
                if reply.status == 200:
                    reply.read()
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            fail(
                f"{a['container']}: {what} did not succeed within {timeout_s:.0f} s ({last}); last log lines: {logs(a['engine'], a['container'])}"
            )
        time.sleep(1)


def main() -> None:
    a = json.loads(base64.b64decode(sys.argv[1]))
    with open(a["key_file"], encoding="utf-8") as handle:
        key = handle.read().strip()
    # First what makes the worker serve its model (Ollama: pull it, name it as the spec does), then the inference.
    for step in a.get("prepare", []):
        until_ok(a, key, step["url"], step["body"], step["timeout_s"], step["what"], each_s=step["timeout_s"])
        print(json.dumps({"container": a["container"], "done": step["what"]}))
    until_ok(a, key, a["url"], a["body"], a["timeout_s"], "a one-token inference")
    if a["gpus"]:
        seen = visible_gpus(a["engine"], a["container"])
        if seen != sorted(a["gpus"]):
            fail(f"{a['container']} runs on GPUs {seen or 'none'}, planned {sorted(a['gpus'])}")
    print(json.dumps({"container": a["container"], "ok": True}))


if __name__ == "__main__":
    main()
