#!/usr/bin/env python3
"""Gate one worker after it was (re)started: it must answer a real one-token inference, run on its planned GPUs,
and not die trying. Run on the host by Ansible's `script` module (role fleet_host, worker.yml), standard library only.

Argument: base64 JSON {"container", "engine", "url", "body", "key_file", "gpus", "timeout_s"}. Polls until the
inference answers 200 (then checks the GPUs the container was given) or the container has exited or restarted
twice (fails at once, with its last log lines), or the start timeout passes. Exit 0: the worker serves.
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


def main() -> None:
    a = json.loads(base64.b64decode(sys.argv[1]))
    with open(a["key_file"], encoding="utf-8") as handle:
        key = handle.read().strip()
    body = json.dumps(a["body"]).encode()
    deadline = time.monotonic() + a["timeout_s"]
    last = ""
    while True:
        status, restarts = state(a["engine"], a["container"])
        if status in ("exited", "dead", "missing") or restarts >= 2:
            fail(
                f"{a['container']} is {status} (restarted {restarts} times); last log lines: {logs(a['engine'], a['container'])}"
            )
        request = urllib.request.Request(
            a["url"], body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                if reply.status == 200:
                    json.load(reply)
                    break
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            fail(
                f"{a['container']} did not answer an inference within {a['timeout_s']} s ({last}); last log lines: {logs(a['engine'], a['container'])}"
            )
        time.sleep(1)
    if a["gpus"]:
        seen = visible_gpus(a["engine"], a["container"])
        if seen != sorted(a["gpus"]):
            fail(f"{a['container']} runs on GPUs {seen or 'none'}, planned {sorted(a['gpus'])}")
    print(json.dumps({"container": a["container"], "ok": True}))


if __name__ == "__main__":
    main()
