"""`controller deploy` onto three fake hosts (tests/multihost/hosts.py), from the laptop, over SSH with Ansible.

One fleet for the module, deployed in order: a preflight failure changes nothing; `--check` shows the diff and
changes nothing; the deploy brings up the mesh, the workers on their GPUs and the gateway, and the official
`openai` SDK is served through the gateway's HTTPS address (chat, stream, embeddings, per-user ACL); the same
deploy again is "no change" and restarts nothing; a second deploy while one holds the lock is refused; a new
worker image that cannot start on one host rolls that host back while the other is applied.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from controller.deploy.lock import fleet_lock
from controller.plan import make_plan
from controller.render import envoy
from controller.spec import load_spec
from controller.spec.models import Images
from tests.images import broken_stand_in, build_stand_in, build_stand_ins
from tests.multihost.fleet import Deploy, Fleet, first_reply, gateway_client, podman
from tests.multihost.hosts import Hosts

pytestmark = [pytest.mark.multihost]


def _compose_files(hosts: Hosts) -> dict[str, bool]:
    return {h.name: h.run("test -e /etc/fleet/compose.yaml", check=False).returncode == 0 for h in hosts}


def _containers(hosts: Hosts) -> dict[str, dict[str, str]]:
    """Per host: the fleet's containers, name -> id:started-at (a restart changes it)."""
    out = {}
    for h in hosts:
        text = h.run("podman ps -a --filter label=io.fleet.fleet=mh --format json").stdout
        out[h.name] = {c["Names"][0]: f"{c['Id'][:12]}:{c.get('StartedAt')}:{c['State']}" for c in json.loads(text)}
    return out


@pytest.mark.timeout(300)
def test_a_preflight_failure_changes_nothing_anywhere(fleet: Fleet, tmp_path: Path) -> None:
    spec = json.loads(json.dumps(__import__("yaml").safe_load(fleet.spec.read_text())))
    missing = "GPU-00000000-0000-4000-8000-00000000dead"
    spec["hosts"][2]["gpus"][0]["uuid"] = missing
    bad = tmp_path / "fleet.yaml"
    bad.write_text(__import__("yaml").safe_dump(spec))
    (tmp_path / "models").symlink_to(fleet.folder / "models")
    result = fleet.deploy("--yes", spec=bad)
    assert result.rc == 4, result.stderr
    problems = result.out["problems"]
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"gpu2: GPU {missing}") and "CDI" in problems[0]
    assert _compose_files(fleet.hosts) == {"gateway": False, "gpu1": False, "gpu2": False}


@pytest.mark.timeout(300)
def test_check_shows_each_hosts_changes_and_changes_nothing(fleet: Fleet) -> None:
    result = fleet.deploy("--check")
    assert result.rc == 0, result.stderr
    gpu1 = result.host("gpu1")
    assert "/etc/fleet/compose.yaml" in gpu1["files"]["added"]
    assert "/etc/fleet/secrets/worker.key" in gpu1["files"]["added"]
    assert sorted(gpu1["services"]["start"])[0].startswith("agent")
    assert any(s.startswith("tiny-embed") for s in gpu1["services"]["start"])
    assert "envoy" in result.host("gateway")["services"]["start"]
    assert all(result.host(h)["result"] == "checked" for h in ("gateway", "gpu1", "gpu2"))
    assert _compose_files(fleet.hosts) == {"gateway": False, "gpu1": False, "gpu2": False}


@pytest.mark.timeout(600)
def test_deploy_brings_the_fleet_up(fleet: Fleet, deployed: Deploy, note: Callable[[str], None]) -> None:
    note(f"first deploy of 3 hosts: {deployed.seconds:.1f}s")
    steps = deployed.out["steps"]
    for step in steps:
        note(f"first deploy: {step['step']} on {', '.join(step['hosts'])}: {step['seconds']:.1f}s")
    # The workers' waves: each a single Ansible run on every host with a worker left to start, never one per worker.
    waves = [s for s in steps if s["step"].startswith("workers ")]
    assert [sorted(s["hosts"]) for s in waves] == [["gpu1", "gpu2"], ["gpu1"]], steps
    # The gateway has the inotify instances its Envoy needs (one per endpoint file), raised where it had fewer.
    need = envoy.inotify_instances(make_plan(load_spec(fleet.spec)))
    gw = fleet.hosts["gateway"]
    now = int(gw.run("cat /proc/sys/fs/inotify/max_user_instances").stdout)
    assert now >= need, f"fs.inotify.max_user_instances is {now}, Envoy's endpoint files need {need}"
    kept = gw.run("cat /etc/sysctl.d/60-fleet-envoy.conf", check=False)
    if kept.returncode == 0:
        assert f"fs.inotify.max_user_instances = {need}\n" in kept.stdout, kept.stdout
    note(
        f"gateway inotify instances: {now} (needs {need}; "
        + ("raised by deploy)" if kept.returncode == 0 else "had enough)")
    )
    assert {h: deployed.host(h)["result"] for h in ("gateway", "gpu1", "gpu2")} == dict.fromkeys(
        ("gateway", "gpu1", "gpu2"), "applied"
    )
    # The mesh: every host reaches every other on its mesh address (the agents listen there).
    for src in fleet.hosts:
        for i, dst in enumerate(fleet.hosts):
            if dst.name == "gateway" or src.name == dst.name:
                continue
            code = f"import socket; socket.create_connection(('10.77.0.{i + 1}', 9400), timeout=5).close()"
            reached = src.run(f'python3 -c "{code}"', check=False)
            assert reached.returncode == 0, f"{src.name} -> {dst.name} over the mesh: {reached.stderr[-300:]}"
    # Each worker container sees only the device it was pinned to.
    gpu1 = fleet.hosts["gpu1"]
    for c in json.loads(gpu1.run("podman ps --filter label=io.fleet.worker --format json").stdout):
        labels = c["Labels"]
        devices = gpu1.run(f"podman exec {c['Names'][0]} ls /dev").stdout.split()
        # only the planned GPU's device node (CDI's hostPath for that UUID, at its container path)
        (gpu,) = [g for g in gpu1.gpus if g.uuid == labels["io.fleet.gpus"]]
        assert [f"/dev/{d}" for d in devices if d.startswith("nvidia")] == [gpu.container_path], (c["Names"], devices)
        listing = gpu1.run(f"podman exec {c['Names'][0]} ls -l {gpu.container_path}").stdout
        assert f"{gpu.device_number[0]}, {gpu.device_number[1]}" in " ".join(listing.split()), listing


def _ca(fleet: Fleet) -> Path:
    gw = fleet.hosts["gateway"]
    mount = gw.run("podman volume inspect fleet-caddy-data --format '{{.Mountpoint}}'").stdout.strip()
    pem = gw.run(f"cat {mount}/caddy/pki/authorities/local/root.crt").stdout
    path = fleet.folder / "gateway-ca.pem"
    path.write_text(pem)
    return path


def _key(fleet: Fleet, user: str) -> str:
    gw = fleet.hosts["gateway"]
    out = gw.run(
        "podman exec fleet-gatekeeper controller keys create --user "
        f"{user} --spec /etc/fleet/spec/fleet.yaml --state-dir /var/lib/fleet --json"
    ).stdout
    key: str = json.loads(out)["key"]
    return key


@pytest.mark.timeout(300)
def test_the_openai_sdk_through_the_gateway(fleet: Fleet, deployed: Deploy) -> None:
    gw_address = fleet.hosts["gateway"].address
    base = f"https://{gw_address}/v1"
    ca = _ca(fleet)
    alice = openai.OpenAI(base_url=base, api_key=_key(fleet, "alice"), http_client=gateway_client(gw_address, ca))
    reply = first_reply(alice, "tiny-chat")
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    chunks = list(
        alice.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    emb = alice.embeddings.create(model="tiny-embed", input="hello")
    assert len(emb.data[0].embedding) > 0
    bob = openai.OpenAI(base_url=base, api_key=_key(fleet, "bob"), http_client=gateway_client(gw_address, ca))
    assert len(bob.embeddings.create(model="tiny-embed", input="x").data) == 1
    with pytest.raises(openai.PermissionDeniedError):
        bob.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert [m.id for m in bob.models.list()] == ["tiny-embed"]
    wrong = openai.OpenAI(base_url=base, api_key="sk-wrong", http_client=gateway_client(gw_address, ca))
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for client in (alice, bob, wrong):
        client.close()


@pytest.mark.timeout(120)
def test_the_console_shows_every_host_from_its_agent_over_the_mesh(fleet: Fleet, deployed: Deploy) -> None:
    """The deployed gatekeeper's console (controller/console/): every worker of the plan, healthy, on the host the
    plan put it on, and every GPU host's agent answering over the mesh; for an admin (alice, group parents) only."""
    gw_address = fleet.hosts["gateway"].address
    ca = _ca(fleet)
    plan = make_plan(load_spec(fleet.spec))
    alice, bob = _key(fleet, "alice"), _key(fleet, "bob")
    with gateway_client(gw_address, ca) as http:
        url = f"https://{gw_address}/console/api/snapshot"
        assert http.get(url, headers={"Authorization": f"Bearer {bob}"}).status_code == 403
        assert http.get(url).status_code == 401
        deadline = time.monotonic() + 60
        while True:
            reply = http.get(url, headers={"Authorization": f"Bearer {alice}"})
            assert reply.status_code == 200, reply.text
            doc = reply.json()
            cards = {w["name"]: w for w in doc["workers"]}
            agents = {h["name"]: h["agent"] for h in doc["hosts"] if h["name"] in {w.host for w in plan.workers}}
            if all(c["health"] == "up" for c in cards.values()) and set(agents.values()) == {"ok"}:
                break
            assert time.monotonic() < deadline, f"not all up after 60 s: {cards}, agents {agents}"
            time.sleep(1)
    assert {n: c["host"] for n, c in cards.items()} == {w.name: w.host for w in plan.workers}
    assert doc["mode"] == "fleet" and doc["sources"]["envoy"] == "ok"


@pytest.mark.timeout(300)
def test_the_same_deploy_again_is_no_change(fleet: Fleet, deployed: Deploy, note: Callable[[str], None]) -> None:
    before = _containers(fleet.hosts)
    again = fleet.deploy("--yes")
    assert again.rc == 0, again.stderr
    assert {h: again.host(h)["result"] for h in ("gateway", "gpu1", "gpu2")} == dict.fromkeys(
        ("gateway", "gpu1", "gpu2"), "no change"
    ), json.dumps(again.out["hosts"], indent=1)
    after = _containers(fleet.hosts)
    logs = {
        f"{h}/{name}": fleet.hosts[h].run(f"podman logs --tail 5 {name}", check=False).stderr[-800:]
        for h in after
        for name in after[h]
        if after[h][name] != before[h].get(name)
    }
    assert after == before, f"a no-change deploy restarted something: {json.dumps(logs, indent=1)}"
    note(f"no-op deploy of 3 hosts: {again.seconds:.1f}s (target 5 s)")
    assert again.seconds < 15


@pytest.mark.timeout(120)
def test_a_second_deploy_while_one_runs_is_refused(fleet: Fleet, deployed: Deploy) -> None:
    with fleet_lock(fleet.state / "fleets" / "mh" / "deploy.lock", "mh", "deploy (the test)"):
        refused = fleet.deploy("--yes", "--wait", "1")
    assert refused.rc == 75, refused.stderr
    assert "is being deployed by" in refused.stderr and "deploy (the test)" in refused.stderr
    assert "Traceback" not in refused.stderr


STREAMS = 50


@pytest.mark.timeout(300)
def test_a_new_user_with_a_limit_reaches_envoy_without_a_restart(fleet: Fleet, deployed: Deploy) -> None:
    """A user with an `rpm` is enforced by Envoy's listener, which it reads from a file it watches (LDS): the
    deploy replaces that file and the spec, which the gatekeeper reloads in place; nothing on the gateway
    restarts, and the new user's key works and is held to the new limit."""
    import yaml

    spec = yaml.safe_load(fleet.spec.read_text())
    spec["users"].append({"name": "carol", "models": ["tiny-chat"], "rpm": 2})
    changed = fleet.folder / "fleet-carol.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    before = _containers(fleet.hosts)
    result = fleet.deploy("--yes", spec=changed)
    assert result.rc == 0, result.stderr[-3000:]
    gateway = result.host("gateway")
    assert gateway["services"]["restart"] == [] and gateway["result"] == "applied", gateway
    assert {"/etc/fleet/envoy/xds/listeners.yaml", "/etc/fleet/spec/fleet.yaml"} <= set(gateway["files"]["changed"])
    after = _containers(fleet.hosts)
    assert after["gateway"] == before["gateway"], "a gateway container was restarted"
    for h in ("gpu1", "gpu2"):  # the agents read the whole spec; the workers do not restart
        assert result.host(h)["services"]["restart"] == ["agent"], result.host(h)
        assert {n: v for n, v in after[h].items() if n != "fleet-agent"} == {
            n: v for n, v in before[h].items() if n != "fleet-agent"
        }
    gw = fleet.hosts["gateway"].address
    client = openai.OpenAI(
        base_url=f"https://{gw}/v1",
        api_key=_key(fleet, "carol"),
        http_client=gateway_client(gw, _ca(fleet)),
        max_retries=0,
    )
    with client:
        for _ in range(2):
            client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    assert limited.value.response.headers.get("retry-after"), limited.value.response.headers


@pytest.mark.timeout(900)
def test_on_demand_models_are_loaded_by_the_host_agent(fleet: Fleet, deployed: Deploy) -> None:
    """Two on-demand models sharing one CPU slot of gpu2 (a swap group): deploy creates their containers and
    leaves them stopped; a request for each, through the gateway, is answered after the swap coordinator on the
    gateway had gpu2's agent stop the other one's container and start its own; then the spec is put back."""
    import yaml

    spec = yaml.safe_load(fleet.spec.read_text())
    (gpu2,) = [h for h in spec["hosts"] if h["name"] == "gpu2"]
    gpu2["cpu_workers"] = 1
    spec["swap_groups"] = [{"name": "spare", "host": "gpu2", "cpu_slots": 1, "min_resident_s": 1}]
    # Named to sort after tiny-chat: a worker's port follows the order of the names on its host, and deploy refuses
    # a port that moves from one worker to another while the first still holds it (noted, not mended here).
    for name in ("word-a", "word-b"):
        spec["models"].append(
            {
                "name": name,
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": "models/tiny.gguf"},
                "context": 512,
                "options": {"threads": 1},
                "swap": {"group": "spare"},
            }
        )
    changed = fleet.folder / "fleet-swap.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))

    def states() -> dict[str, str]:
        return {
            name.removeprefix("fleet-").split("-gpu2")[0]: state.rsplit(":", 1)[1]
            for name, state in _containers(fleet.hosts)["gpu2"].items()
            if name.startswith("fleet-word-")
        }

    # The operator's step on a podman host: the engine's API where the agent's container mounts it (Docker's path;
    # podman-docker and podman.socket give it there). Without it the deploy is refused, saying so.
    refused = fleet.deploy("--yes", spec=changed)
    assert refused.rc != 0 and any("/var/run/docker.sock" in p for p in refused.out.get("problems", [])), refused.out
    fleet.hosts["gpu2"].run(
        "rm -rf /var/run/docker.sock; setsid podman system service --time=0 unix:///var/run/docker.sock "
        ">/var/log/podman-api.log 2>&1 < /dev/null & for i in $(seq 50); do [ -S /var/run/docker.sock ] && exit 0; "
        "sleep 0.1; done; exit 1"
    )
    try:
        result = fleet.deploy("--yes", spec=changed)
        assert result.rc == 0, result.stderr[-3000:]
        assert set(states()) == {"word-a", "word-b"}
        assert "running" not in states().values(), states()  # created, not started: nothing loaded at deploy
        gw = fleet.hosts["gateway"].address
        client = openai.OpenAI(
            base_url=f"https://{gw}/v1",
            api_key=_key(fleet, "alice"),
            http_client=gateway_client(gw, _ca(fleet)),
            max_retries=0,
        )
        with client:
            assert first_reply(client, "word-a").choices[0].message.content is not None
            assert states()["word-a"] == "running" and states()["word-b"] != "running", states()
            time.sleep(1.5)  # past min_resident_s
            for model in ("word-b", "word-a"):
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                assert reply.usage is not None and reply.usage.completion_tokens > 0
                assert states()[model] == "running" and "running" not in (
                    v for k, v in states().items() if k != model
                ), states()
                time.sleep(1.5)
        port = spec["gateway"].get("ports", {}).get("swapper", 9095)
        status = json.loads(fleet.hosts["gateway"].run(f"curl -fsS http://127.0.0.1:{port}/swap/status").stdout)
        by_model = {w["model"]: w for w in status["workers"].values()}
        assert by_model["word-a"]["state"] == "resident" and by_model["word-b"]["state"] == "unloaded", by_model
        assert by_model["word-a"]["loads"] == 2 and by_model["word-b"]["loads"] == 1, by_model
    finally:
        back = fleet.deploy("--yes")
        assert back.rc == 0, back.stderr[-3000:]
    assert not states(), states()  # the models that left the spec took their containers along


@pytest.mark.timeout(600)
def test_a_rolling_deploy_under_load_drops_nothing(fleet: Fleet, deployed: Deploy, note: Callable[[str], None]) -> None:
    """Both tiny-chat replicas are replaced (a changed option) while 50 streams are live and a steady load runs:
    each replica is drained at the gateway before it stops, so every request succeeds and every stream ends."""
    import threading

    import yaml

    spec = yaml.safe_load(fleet.spec.read_text())
    (chat,) = [m for m in spec["models"] if m["name"] == "tiny-chat"]
    chat["options"]["threads"] = 2
    changed = fleet.folder / "fleet-threads.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    gw = fleet.hosts["gateway"].address
    ca = _ca(fleet)
    client = openai.OpenAI(
        base_url=f"https://{gw}/v1", api_key=_key(fleet, "alice"), http_client=gateway_client(gw, ca), max_retries=0
    )
    errors: list[str] = []
    finished: list[str] = []
    started = threading.Barrier(STREAMS + 1, timeout=120)
    stop = threading.Event()
    requests = [0]

    def stream() -> None:
        try:
            chunks = client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "go"}],
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            reason = None
            for i, chunk in enumerate(chunks):
                if i == 0:
                    started.wait()
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
            finished.append(str(reason))
        except Exception as exc:  # every failure is counted, none hidden: the assertion below lists them
            errors.append(f"stream: {exc!r}")

    def load() -> None:
        while not stop.is_set():
            try:
                client.chat.completions.create(
                    model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                requests[0] += 1
            except Exception as exc:  # counted, as above
                errors.append(f"request: {exc!r}")

    threads = [threading.Thread(target=stream) for _ in range(STREAMS)] + [
        threading.Thread(target=load) for _ in range(2)
    ]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first chunk
    result = fleet.deploy("--yes", spec=changed)
    stop.set()
    for t in threads:
        t.join(300)
    client.close()
    assert result.rc == 0, result.stderr[-3000:]
    assert errors == [], f"{len(errors)} failed: {errors[:5]}"
    assert finished == ["length"] * STREAMS
    # both replicas were replaced (and the agents, which read the spec); tiny-embed was not touched
    assert set(result.host("gpu1")["services"]["restart"]) == {"tiny-chat-gpu1-gpu0", "agent"}
    assert set(result.host("gpu2")["services"]["restart"]) == {"tiny-chat-gpu2-gpu0", "agent"}
    assert requests[0] > 10
    note(
        f"rolling deploy with {STREAMS} live streams and {requests[0]} other requests: 0 failed, {result.seconds:.1f}s"
    )


@pytest.mark.timeout(600)
def test_a_worker_image_that_cannot_start_rolls_its_host_back(fleet: Fleet, deployed: Deploy, tmp_path: Path) -> None:
    import yaml

    new_tag = "ghcr.io/ggml-org/llama.cpp:server-cuda-b6801"
    spec = yaml.safe_load(fleet.spec.read_text())
    spec["images"] = {"llamacpp": new_tag}
    newer = fleet.folder / "fleet-b6801.yaml"
    newer.write_text(yaml.safe_dump(spec, sort_keys=False))
    # The new version: a working server on gpu1, one that exits at once on gpu2.
    good = Images()
    build_stand_ins(fleet.store[0], fleet.store[1], good)
    podman(fleet.store, "tag", good.llamacpp, new_tag)
    podman(fleet.store, "save", "-o", str(tmp_path / "good.tar"), new_tag)
    fleet.hosts["gpu1"].run(f"podman load -i {tmp_path / 'good.tar'}")
    build_stand_in(fleet.store[0], fleet.store[1], new_tag, broken_stand_in())
    podman(fleet.store, "save", "-o", str(tmp_path / "bad.tar"), new_tag)
    fleet.hosts["gpu2"].run(f"podman load -i {tmp_path / 'bad.tar'}")
    result = fleet.deploy("--yes", spec=newer)
    assert result.rc == 10, result.stderr
    assert result.host("gpu1")["result"] == "applied"
    assert result.host("gpu2")["result"] == "failed"
    failure: dict[str, Any] = result.host("gpu2")["failure"]
    assert "rolled back to the previous deploy: yes" in failure["message"], failure
    # gpu2 serves again with the previous image
    gpu2 = fleet.hosts["gpu2"]
    running = json.loads(gpu2.run("podman ps --filter label=io.fleet.worker --format json").stdout)
    assert running and all(c["Image"] != new_tag for c in running), running


@pytest.mark.timeout(900)
def test_a_host_dropped_from_the_spec_is_retired(
    fleet: Fleet, deployed: Deploy, gpu_image: str, note: Callable[[str], None]
) -> None:
    """gpu2 leaves the spec: --check says it would be retired and changes nothing; the deploy removes the fleet's
    containers, files and mesh interface there (a container the fleet does not own keeps running), the other
    hosts drop it from the mesh and the gateway, and the model it served keeps answering from gpu1. Then the
    first spec again brings gpu2 back, for the modules after this one."""
    import yaml

    gpu2 = fleet.hosts["gpu2"]
    gpu2.run(f"podman run -d --name not-ours {gpu_image} sleep 3600")
    spec = yaml.safe_load(fleet.spec.read_text())
    spec["hosts"] = [h for h in spec["hosts"] if h["name"] != "gpu2"]
    (chat,) = [m for m in spec["models"] if m["name"] == "tiny-chat"]
    chat["replicas"], chat["placement"] = 1, chat["placement"][:1]
    smaller = fleet.folder / "fleet-no-gpu2.yaml"
    smaller.write_text(yaml.safe_dump(spec, sort_keys=False))
    interface = spec["mesh"].get("interface", "fleet0")
    try:
        check = fleet.deploy("--check", spec=smaller)
        assert check.rc == 0, check.stderr[-2000:]
        assert check.out["retire"] == {"gpu2": {"result": "checked"}}, check.out
        assert gpu2.run("podman ps -q --filter label=io.fleet.fleet=mh").stdout.strip()

        began = time.monotonic()
        result = fleet.deploy("--yes", spec=smaller)
        assert result.rc == 0, json.dumps(result.out, indent=1)[-4000:]
        retired = result.out["retire"]["gpu2"]
        assert retired["result"] == "retired", retired
        assert gpu2.run("podman ps -a -q --filter label=io.fleet.fleet=mh").stdout.strip() == ""
        assert gpu2.run("podman ps -q --filter name=not-ours").stdout.strip(), "a container not ours was touched"
        assert (
            gpu2.run("ls -A /etc/fleet 2>/dev/null; ls -A /var/lib/fleet/deploy 2>/dev/null", check=False).stdout == ""
        )
        assert gpu2.run(f"ip link show {interface}", check=False).returncode != 0
        peers = fleet.hosts["gateway"].run(f"wg show {interface} peers").stdout.split()
        mesh = {h: result.host(h)["mesh"] for h in ("gateway", "gpu1")}
        assert len(peers) == 1, f"{peers}; mesh changed: {mesh}"  # gpu1 only
        gw = fleet.hosts["gateway"].address
        with openai.OpenAI(
            base_url=f"https://{gw}/v1",
            api_key=_key(fleet, "alice"),
            http_client=gateway_client(gw, _ca(fleet)),
            max_retries=0,
        ) as client:
            for _ in range(4):
                client.chat.completions.create(
                    model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
        note(f"gpu2 retired in a {time.monotonic() - began:.1f}s deploy; volumes kept: {retired['volumes_kept']}")
        again = fleet.deploy("--yes", spec=smaller)
        assert again.rc == 0 and again.out["retire"] == {}, again.out
    finally:  # the first spec again, for the modules after this one; judged below, so a failure above shows
        gpu2.run("podman rm -f -t 0 not-ours", check=False)
        back = fleet.deploy("--yes")
    assert back.rc == 0, json.dumps(back.out, indent=1)[-3000:] + back.stderr[-2000:]
    assert back.host("gpu2")["result"] == "applied"
