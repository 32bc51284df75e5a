"""The container images: the project's own, built by `controller images build`, and the test stand-ins for the
third-party ones (tests/images.py), each run with what the rendered files run.

Everything lives in a private podman store (``--root``/``--runroot``/``--tmpdir``, vfs, this machine's
containers.conf: tests/podman_service.py), removed afterwards; containers run with ``--network none``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.images.build import (
    LABEL_CONTENT,
    LABEL_IMAGE,
    LABEL_VERSION,
    VERSION,
    image_info,
    load_image,
    save_image,
)
from controller.plan import Plan, make_plan
from controller.render.containers import SPEC_DIR, SPEC_PATH, Container, host_containers
from controller.spec import load_spec
from tests.conftest import ROOT, VENV_BIN, need_tool
from tests.images import STAND_IN_LABEL, build_stand_ins, podman_store

pytestmark = pytest.mark.contract

SPEC = ROOT / "examples" / "workstation.yaml"  # one host: a llama.cpp worker, the agent and the whole gateway


@dataclass
class Store:
    cmd: list[str]
    env: dict[str, str]
    engine_args: list[str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.cmd, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr[-2000:]}")
        return result

    def inspect(self, tag: str) -> dict[str, object]:
        found: list[dict[str, object]] = json.loads(self.run("image", "inspect", tag).stdout)
        return found[0]

    def container(
        self, image: str, *argv: str, entrypoint: list[str] | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``podman run --rm --network none`` of ``image`` with ``argv`` (and ``entrypoint``, ``env`` where given)."""
        ep = ["--entrypoint", json.dumps(entrypoint)] if entrypoint is not None else []
        ev = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
        return self.run("run", "--rm", "--network", "none", *ep, *ev, image, *argv, check=False)


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    podman = need_tool("podman", "install podman (apt-get install podman runc)")
    need_tool("runc", "install runc (apt-get install runc)")
    folder = Path(tempfile.mkdtemp(prefix="fleet-img-"))
    cmd, env = podman_store(folder, podman)
    try:
        yield Store(cmd, env, cmd[1:])
    finally:
        subprocess.run([*cmd, "rm", "--all", "--force"], env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def plan() -> Plan:
    return make_plan(load_spec(SPEC))


@pytest.fixture(scope="module")
def containers(plan: Plan) -> dict[str, Container]:
    assert plan.fleet.hosts
    return {c.name: c for c in host_containers(plan, plan.fleet.hosts[0].name)}


def controller_cli(store: Store, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "controller"), *args], env=env or store.env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def fleet_build(store: Store) -> dict[str, object]:
    """`controller images build SPEC --json`, engine arguments given with --engine-arg, as a user would."""
    started = time.monotonic()
    result = controller_cli(
        store, "images", "build", str(SPEC), *(f"--engine-arg={a}" for a in store.engine_args), "--json"
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    data["wall_s"] = time.monotonic() - started
    return data


@pytest.mark.timeout(240)
def test_build_tags_and_labels_as_the_spec_says(store: Store, plan: Plan, fleet_build: dict[str, object]) -> None:
    images = fleet_build["images"]
    assert isinstance(images, list)
    by_name = {i["name"]: i for i in images}
    assert set(by_name) == {"gatekeeper", "agent"}
    for name in ("gatekeeper", "agent"):
        tag = getattr(plan.fleet.images, name)
        assert by_name[name]["tag"] == tag
        info = store.inspect(tag)
        assert str(info["Id"]).removeprefix("sha256:") == by_name[name]["id"]
        labels = info["Config"]["Labels"]  # type: ignore[index]
        assert labels[LABEL_IMAGE] == name
        assert labels[LABEL_VERSION] == VERSION == "0.1.0"
        assert labels[LABEL_CONTENT] == fleet_build["content"]
        assert tag in info["RepoTags"]  # type: ignore[operator]
        # Small enough to ship: the interpreter, its libraries and the controller's dependencies, no programs.
        assert int(info["Size"]) < 400 * 2**20  # type: ignore[call-overload]
    assert not fleet_build["missing_libraries"]


@pytest.mark.timeout(120)
def test_second_build_is_cached(store: Store, fleet_build: dict[str, object]) -> None:
    """The same content under the same tags: nothing imported, the same ids (engine arguments from the env)."""
    env = {**store.env, "FLEET_ENGINE_ARGS": " ".join(store.engine_args)}
    result = controller_cli(store, "images", "build", str(SPEC), "--json", env=env)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["content"] == fleet_build["content"]
    assert [(i["tag"], i["id"]) for i in again["images"]] == [(i["tag"], i["id"]) for i in fleet_build["images"]]  # type: ignore[attr-defined]
    assert all(i["cached"] for i in again["images"])
    listed = controller_cli(store, "images", "list", str(SPEC), "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert all(row["present"] and row["content"] == fleet_build["content"] for row in json.loads(listed.stdout))


@pytest.mark.timeout(60)
def test_missing_engine_is_one_clear_line(store: Store) -> None:
    result = controller_cli(store, "images", "build", "--engine", "no-such-engine-here")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no-such-engine-here not found; install podman (Debian/Ubuntu: apt-get install podman) "
        "or pass --engine docker"
    ]


@pytest.mark.timeout(120)
def test_programs_run_in_the_images(
    store: Store, fleet_build: dict[str, object], containers: dict[str, Container]
) -> None:
    for name, program in (("gatekeeper", "fleet-gatekeeper"), ("agent", "fleet-agent")):
        image = containers[name].image
        assert containers[name].args[0] == program  # the rendered command names the launcher the image has
        result = store.container(image, program, "--help")
        assert result.returncode == 0, result.stderr
        assert "--spec" in result.stdout
    probe = (
        "import controller.gateway.gatekeeper, controller.agent.service, ssl, sqlite3, ctypes; "
        "from controller.render import asset; asset('envoy', 'model_router.lua'); "
        "print(ssl.get_default_verify_paths().cafile)"
    )
    result = store.container(containers["gatekeeper"].image, "python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/etc/ssl/certs/ca-certificates.crt"
    # The rendered health checks: python3 is there and their code compiles.
    for name in ("gatekeeper", "agent"):
        health = containers[name].health
        assert health is not None and health.cmd[:3] == ["CMD", "python3", "-c"]
        check = f"compile({health.cmd[3]!r}, 'healthcheck', 'exec')"
        result = store.container(containers[name].image, "python3", "-c", check)
        assert result.returncode == 0, result.stderr


@pytest.mark.timeout(120)
def test_gatekeeper_serves_its_health_check(
    store: Store, fleet_build: dict[str, object], containers: dict[str, Container]
) -> None:
    """The gatekeeper's image started with the rendered command line (spec and state mounted) answers the
    rendered health check from inside its container."""
    gk = containers["gatekeeper"]
    assert gk.health is not None
    assert not gk.secrets, "this test mounts no secrets"
    with tempfile.TemporaryDirectory(prefix="fleet-gk-") as tmp:
        volumes = []
        for i, volume in enumerate(gk.volumes):  # the spec where the rendered unit mounts it; folders elsewhere
            if volume.target == SPEC_DIR:  # the folder deploy puts the spec in
                (Path(tmp) / "spec").mkdir()
                shutil.copyfile(SPEC, Path(tmp) / "spec" / Path(SPEC_PATH).name)
                source = f"{tmp}/spec"
            else:
                (Path(tmp) / str(i)).mkdir()
                source = f"{tmp}/{i}"
            volumes += ["--volume", f"{source}:{volume.target}"]
        name = "fleet-test-gatekeeper"
        store.run("run", "--detach", "--name", name, "--network", "none", *volumes, gk.image, *gk.args)
        try:
            deadline = time.monotonic() + 60
            while True:
                result = store.run("exec", name, *gk.health.cmd[1:], check=False)
                if result.returncode == 0:
                    break
                state = store.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
                logs = store.run("logs", name, check=False)
                assert state == "true", f"the gatekeeper exited: {logs.stdout[-1500:]}{logs.stderr[-1500:]}"
                assert time.monotonic() < deadline, f"no health after 60 s: {result.stderr[-1000:]}"
                time.sleep(0.5)
        finally:
            store.run("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def stand_ins(store: Store, plan: Plan) -> dict[str, str]:
    built = build_stand_ins(store.cmd, store.env, plan.fleet.images)
    again = build_stand_ins(store.cmd, store.env, plan.fleet.images)
    assert again == built  # cached: the same image under each tag
    return built


def _stand_in(store: Store, tag: str) -> dict[str, str]:
    labels: dict[str, str] = store.inspect(tag)["Config"]["Labels"]  # type: ignore[index]
    assert STAND_IN_LABEL in labels, f"{tag} is not a test stand-in"
    return labels


@pytest.mark.timeout(180)
def test_stand_ins_start_with_the_rendered_command_lines(
    store: Store, stand_ins: dict[str, str], containers: dict[str, Container]
) -> None:
    for tag in stand_ins:
        _stand_in(store, tag)
    # llama.cpp: the image's own entrypoint (the rendered one is empty), llama-server's version; curl for its check.
    worker = next(c for c in containers.values() if c.image.startswith("ghcr.io/ggml-org/llama.cpp"))
    assert worker.entrypoint == [] and worker.args[0].startswith("--")
    result = store.container(worker.image, "--version")
    assert result.returncode == 0, result.stderr
    assert "version" in result.stdout + result.stderr
    assert worker.health is not None and worker.health.cmd[1] == "curl"
    assert store.container(worker.image, "--version", entrypoint=["curl"]).returncode == 0
    # Envoy: flags after the official entrypoint mean `envoy <flags>`; bash for the health check.
    envoy = containers["envoy"]
    assert envoy.args[0].startswith("-")
    result = store.container(envoy.image, "--version", env=envoy.env)  # the rendered ENVOY_UID=0: root
    assert result.returncode == 0 and "1.40.0" in result.stdout, result.stderr
    # without it the official image would drop to uid 101, which cannot read the 0600 secrets: the stand-in refuses
    assert store.container(envoy.image, "--version").returncode != 0
    assert envoy.health is not None and envoy.health.cmd[1:3] == ["bash", "-c"]
    assert store.container(envoy.image, "bash", "-n", "-c", envoy.health.cmd[3], env=envoy.env).returncode == 0
    # Caddy: the rendered command starts with `caddy`, on the PATH.
    caddy = containers["caddy"]
    assert caddy.args[:2] == ["caddy", "run"]
    result = store.container(caddy.image, caddy.args[0], "version")
    assert result.returncode == 0 and result.stdout.startswith("v2."), result.stderr
    # Prometheus and Alertmanager: rendered flags go to the image's entrypoint.
    for name, program in (("prometheus", "prometheus"), ("alertmanager", "alertmanager")):
        rendered = containers[name]
        assert rendered.entrypoint == [] and rendered.args[0].startswith("--")
        result = store.container(rendered.image, "--version")
        assert result.returncode == 0 and f"{program}, version" in result.stdout + result.stderr, result.stderr
    # busybox wget, for the wget health checks: it runs, and finds nothing listening on port 1.
    for name in ("caddy", "prometheus", "alertmanager", "grafana"):
        health = containers[name].health
        assert health is not None and health.cmd[1] == "wget"
        result = store.container(
            containers[name].image, "-q", "-O", "/dev/null", "http://127.0.0.1:1/", entrypoint=["wget"]
        )
        assert result.returncode == 1 and "refused" in result.stderr, (name, result.stderr)


@pytest.mark.timeout(120)
def test_grafana_stand_in_answers_the_rendered_health_check(
    store: Store, stand_ins: dict[str, str], containers: dict[str, Container]
) -> None:
    grafana = containers["grafana"]
    assert _stand_in(store, grafana.image)[STAND_IN_LABEL] == "grafana"
    assert grafana.health is not None
    env = [a for k, v in grafana.env.items() for a in ("--env", f"{k}={v}")]
    name = "fleet-test-grafana"
    store.run("run", "--detach", "--name", name, "--network", "none", *env, grafana.image, *grafana.args)
    try:
        deadline = time.monotonic() + 30
        while True:
            result = store.run("exec", name, *grafana.health.cmd[1:], check=False)
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no answer on /api/health: {result.stderr[-1000:]}"
            time.sleep(0.2)
        # It listens where the rendered environment says, and nowhere else.
        other = store.run("exec", name, "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:1/api/health", check=False)
        assert other.returncode != 0
    finally:
        store.run("rm", "--force", "--time", "0", name, check=False)


@pytest.mark.timeout(180)
def test_save_and_load_carry_both_tags(store: Store, fleet_build: dict[str, object]) -> None:
    """What deploy does: one archive of both images (save_image), loaded on another host's store (load_image)."""
    tags = [str(i["tag"]) for i in fleet_build["images"]]  # type: ignore[attr-defined]
    folder = Path(tempfile.mkdtemp(prefix="fleet-img2-"))
    other_cmd, other_env = podman_store(folder, store.cmd[0])
    try:
        archive = folder / "fleet-images.tar"
        save_image(store.cmd, tags, archive, env=store.env)
        loaded = load_image(other_cmd, archive, env=other_env)
        assert sorted(loaded) == sorted(tags)
        for image in fleet_build["images"]:  # type: ignore[attr-defined]
            info = image_info(other_cmd, image["tag"], other_env)
            assert info is not None and info["labels"][LABEL_IMAGE] == image["name"]
            assert info["labels"][LABEL_CONTENT] == fleet_build["content"]
    finally:
        subprocess.run([*other_cmd, "rmi", "--all", "--force"], env=other_env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
