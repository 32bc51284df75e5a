"""`examples/homelab.yaml`, deployed with `controller deploy` onto test hosts of its own, then used through the gateway
with the official `openai` SDK as the family would: a chat on `llama` (vLLM), a chat on `coder` (vLLM) and an
embedding on `nomic-embed` (llama.cpp), with a key made for `alex`.

The file is deployed as it is but for one thing: each host's ``ssh`` target says ``root@`` where it says ``ops@`` (the
test hosts let only root in, by key; see the report of `test_the_homelab_example_deploys`). Everything else, the
names included, stays, and the test hosts resolve them as a home network's DNS would:

- hosts ``gateway``, ``tower`` (2 fake GPUs) and ``den`` (1), made by tests/multihost/hosts.py, their CDI specs
  rewritten to declare the example's own GPU UUIDs (the fake GPUs have no memory; the plan uses the spec's
  ``vram_gib``). ``*.home.arpa`` (the SSH targets, the WireGuard endpoints) are the hosts' underlay addresses: in the
  laptop's ssh_config (``HostName``) and in each host's /etc/hosts;
- a fourth host, ``internet``, is what the hosts would reach on the internet, under the real names (in the hosts'
  /etc/hosts): ``acme-v02.api.letsencrypt.org`` (Let's Encrypt's ACME directory, which the rendered Caddy uses for
  ``tls.mode: acme``) is Caddy's own ACME server (``acme_server``, HTTP-01 checked against ``llm.example.org``, which
  the internet host resolves to the gateway); ``huggingface.co`` serves a tiny GGUF (a random-weight llama written
  with the ``gguf`` library, not nomic-embed) at the spec's URL path, downloaded by the llama.cpp worker itself
  with ``--model-url``; ``ntfy.example.org`` answers the alert webhook (not exercised: no alert fires). One test
  CA signs all of it; the stand-in images of Caddy and llama.cpp trust it where the official ones carry the public
  roots, and the SDK client trusts it as a real client trusts Let's Encrypt's;
- images: the project's own, built by `controller images build`'s code, are already in the hosts' stores when
  deploy runs (as after an earlier deploy: deploy's ``--image`` finds them there and ships nothing; shipping them,
  200 MB each through Ansible, is test_deploy.py's and would take most of this module's time); stand-ins for the
  third-party ones (tests/images.py) at the tags the spec pins, loaded into each host's store as it would pull
  them. vLLM's is the vLLM double (tests/doubles/vllm.py) behind `vllm serve`'s entrypoint; llama.cpp's is a newer
  llama-server than the pinned b6800, with a shim giving ``--model-url`` b6800's meaning (tests/images.py,
  ``LLAMACPP_MODEL_URL_SHIM``);
- ``secrets.hf_token_file``: the operator puts a (fake) token at /etc/fleet/secrets/hf_token on the vLLM hosts,
  before the deploy (README, "Deploy to your hosts"); the vLLM stand-in refuses to start without it, as a gated
  model's download would fail.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.local.demo_model import write_demo_model
from controller.plan import make_plan
from controller.render.containers import host_containers
from controller.spec import load_spec
from tests.conftest import ROOT
from tests.images import build_stand_in, caddy_stand_in, llamacpp_stand_in, podman_store, vllm_stand_in
from tests.multihost.conftest import LaptopImages, need_hosts
from tests.multihost.fleet import VENV_BIN, Deploy, deploy, first_reply, gateway_client, podman
from tests.multihost.hosts import Hosts, HostSpec, cdi_spec

pytestmark = [pytest.mark.multihost]

EXAMPLE = ROOT / "examples" / "homelab.yaml"
# The internet, as the hosts reach it: one test host under these names.
ACME_NAME = "acme-v02.api.letsencrypt.org"  # Caddy's default ACME CA (Let's Encrypt's production directory)
ACME_FOLDER = f"{ACME_NAME}-directory"  # where Caddy keeps what that CA issued
INTERNET = "internet"
HF_TOKEN = "hf_fleet_test_token_not_a_real_one\n"

INTERNET_CADDYFILE = """\
# The internet, for the homelab test (tests/multihost/test_homelab.py): one Caddy under the real names.
{{
	admin 127.0.0.1:2019
	skip_install_trust
	pki {{
		ca local {{
			name "fleet test CA"
			root {{
				cert {root_cert}
				key {root_key}
			}}
		}}
	}}
}}

# Let's Encrypt's directory URL is /directory; Caddy's ACME server serves it (and the rest) under /acme/local/.
{acme} {{
	tls internal
	rewrite /directory /acme/local/directory
	acme_server {{
		challenges http-01
	}}
}}

huggingface.co {{
	tls internal
	root * {www}
	file_server
}}

ntfy.example.org {{
	tls internal
	respond 200
}}
"""


@dataclass
class Homelab:
    hosts: Hosts
    folder: Path
    spec: Path
    ssh_config: Path
    ca: Path  # the test CA's root certificate: what issued the gateway's certificate, as Let's Encrypt would
    result: Deploy
    changes: list[str]  # the spec's diff against the example
    notes: list[str]  # what the test put in place of the real thing, and timings


def _test_ca(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet homelab test root CA")])
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))  # past the intermediate Caddy makes (7 days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "test-ca.crt", folder / "test-ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _spec(folder: Path) -> tuple[Path, list[str]]:
    """The example with ``ops@`` → ``root@`` in each ``ssh`` target, nothing else; and the diff."""
    text = EXAMPLE.read_text()
    changed = text.replace("    ssh: ops@", "    ssh: root@")
    path = folder / "homelab.yaml"
    path.write_text(changed)
    diff = [
        line
        for line in difflib.unified_diff(text.splitlines(), changed.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return path, diff


def _give_example_gpus(hosts: Hosts, example: dict[str, Any]) -> None:
    """Each GPU host's fake GPUs declared (CDI) under the example's UUIDs, names and memory."""
    for entry in example["hosts"]:
        host = hosts[entry["name"]]
        gpus = entry.get("gpus", [])
        assert len(gpus) == len(host.gpus), (entry["name"], gpus, host.gpus)
        host.gpus[:] = [
            dataclasses.replace(fake, uuid=g["uuid"], name=g["name"], vram_gib=g["vram_gib"])
            for fake, g in zip(host.gpus, gpus, strict=True)
        ]
        if gpus:
            host.run("cat > /etc/cdi/nvidia.yaml", stdin=cdi_spec(host.gpus))


def _names(hosts: Hosts, example: dict[str, Any], gateway_name: str) -> Path:
    """The example's names, resolved: on the hosts (/etc/hosts) and on the laptop (an ssh_config); the path of that
    ssh_config."""
    internet = hosts[INTERNET].address
    home = "".join(f"{hosts[h['name']].address}\t{urlparse('ssh://' + h['ssh']).hostname}\n" for h in example["hosts"])
    world = f"{internet}\t{ACME_NAME} huggingface.co ntfy.example.org\n"
    for entry in example["hosts"]:
        hosts[entry["name"]].run("cat >> /etc/hosts", stdin=home + world)
    hosts[INTERNET].run("cat >> /etc/hosts", stdin=f"{hosts[example['gateway']['host']].address}\t{gateway_name}\n")
    blocks = "".join(
        f"Host {urlparse('ssh://' + h['ssh']).hostname}\n  HostName {hosts[h['name']].address}\n\n"
        for h in example["hosts"]
    )
    config = hosts.folder / "laptop" / "homelab_ssh_config"
    config.write_text(
        f"# The homelab's names, as the operator's DNS or ~/.ssh/config has them; then the test hosts' keys.\n"
        f"{blocks}Host *\n  Include {hosts.ssh_config}\n"
    )
    return config


def _start_internet(hosts: Hosts, folder: Path, ca: tuple[Path, Path], model_url: str) -> None:
    """The internet host's Caddy: the ACME directory, the model file at its URL's path, the webhook."""
    www = folder / "www"
    model = www / urlparse(model_url).path.lstrip("/")
    model.parent.mkdir(parents=True)
    write_demo_model(model, name="tiny")
    caddyfile = folder / "internet.Caddyfile"
    caddyfile.write_text(INTERNET_CADDYFILE.format(root_cert=ca[0], root_key=ca[1], acme=ACME_NAME, www=www))
    data = folder / "internet-caddy"
    internet = hosts[INTERNET]
    internet.run(
        f"XDG_DATA_HOME={data}/data XDG_CONFIG_HOME={data}/config setsid -f {VENV_BIN / 'caddy'} run "
        f"--config {caddyfile} --adapter caddyfile >{folder}/internet-caddy.log 2>&1 </dev/null"
    )
    # Up once the gateway reaches the ACME directory by its name and trusts it.
    gateway = hosts["gateway"]
    deadline = time.monotonic() + 30
    while True:
        got = gateway.run(f"curl -fsS --cacert {ca[0]} https://{ACME_NAME}/directory", check=False)
        if got.returncode == 0 and "newOrder" in got.stdout:
            return
        if time.monotonic() > deadline:
            log = (folder / "internet-caddy.log").read_text()[-3000:]
            pytest.fail(f"the internet host's ACME directory did not answer: {got.stderr} | {log}")
        time.sleep(0.3)


def _images(
    hosts: Hosts, plan_hosts: dict[str, set[str]], laptop: LaptopImages, ca_pem: bytes, folder: Path
) -> list[str]:
    """Each host's third-party images in its own store, as it would pull them: vLLM's stand-in and the Caddy and
    llama.cpp stand-ins that trust the test CA from a store of this module's own, the rest from the session's."""
    spec_images = load_spec(EXAMPLE).fleet.images
    store_dir = Path(tempfile.mkdtemp(prefix="fmh-hl-", dir="/tmp"))  # short: podman's runroot
    store = podman_store(store_dir)
    notes = []
    try:
        own = {
            spec_images.vllm: vllm_stand_in(),
            spec_images.caddy: caddy_stand_in(ca_pem),
            spec_images.llamacpp: llamacpp_stand_in(ca_pem),
        }
        began = time.monotonic()
        for tag, stand_in in own.items():
            build_stand_in(store[0], store[1], tag, stand_in)
        notes.append(
            f"homelab stand-ins (vLLM, Caddy and llama.cpp with the test CA) built in {time.monotonic() - began:.1f}s"
        )
        began = time.monotonic()
        for name, tags in plan_hosts.items():
            # The project's own images too, loaded ahead: deploy then finds them on the hosts (as after an earlier
            # deploy) and ships nothing. Shipping them (200 MB each through Ansible's copy) is test_deploy.py's, and
            # would take most of this module's time.
            for tag in sorted(tags & set(laptop.own)):
                hosts[name].run(f"podman load -i {laptop.own[tag]}", timeout=300)
            needed = tags - set(laptop.own)
            mine = sorted(needed & set(own))
            session = sorted(needed - set(own))
            missing = [t for t in session if t not in laptop.third]
            assert not missing, f"no stand-in for {missing}"
            if mine:
                podman(store, "save", "-m", "-o", str(folder / f"{name}-homelab.tar"), *mine)
                hosts[name].run(f"podman load -i {folder / f'{name}-homelab.tar'}", timeout=300)
            if session:
                bundle = laptop.save(folder / f"{name}-session.tar", session)
                hosts[name].run(f"podman load -i {bundle}", timeout=300)
        notes.append(
            f"images loaded into the 3 hosts' stores in {time.monotonic() - began:.1f}s (the project's own too)"
        )
    finally:
        podman(store, "system", "reset", "--force")
        shutil.rmtree(store_dir, ignore_errors=True)
    return notes


@pytest.fixture(scope="module")
def homelab(laptop_images: LaptopImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homelab]:
    need_hosts()
    example = yaml.safe_load(EXAMPLE.read_text())
    folder = tmp_path_factory.mktemp("homelab")
    spec, changes = _spec(folder)
    plan = make_plan(load_spec(spec))
    specs = [HostSpec(h["name"], gpus=len(h.get("gpus", []))) for h in example["hosts"]] + [HostSpec(INTERNET)]
    notes: list[str] = []
    began = time.monotonic()
    with Hosts(tmp_path_factory.mktemp("hl"), specs) as hosts:
        notes.append(f"4 hosts up in {hosts.setup_seconds:.1f}s")
        _give_example_gpus(hosts, example)
        ssh_config = _names(hosts, example, plan.fleet.gateway.public_name)
        ca = _test_ca(folder)
        (embed,) = [m for m in example["models"] if str(m["source"].get("gguf", "")).startswith("https://")]
        _start_internet(hosts, folder, ca, embed["source"]["gguf"])
        per_host = {h.name: {c.image for c in host_containers(plan, h.name)} for h in plan.fleet.hosts or []}
        notes += _images(hosts, per_host, laptop_images, ca[0].read_bytes(), folder)
        # The operator's step before the first deploy (README, "Deploy to your hosts"): the token on the hosts that
        # run vLLM workers, 0600 in a 0700 folder.
        token_file = plan.fleet.secrets.hf_token_file
        assert token_file is not None
        for name in sorted({w.host for w in plan.workers if w.backend == "vllm"}):
            hosts[name].run(f"umask 077 && mkdir -p {Path(token_file).parent} && cat > {token_file}", stdin=HF_TOKEN)
        result = deploy(spec, hosts, folder / "state", laptop_images.own, "--yes", ssh_config=ssh_config)
        notes.append(
            f"deploy of 3 hosts, 4 workers: {result.seconds:.1f}s (module setup {time.monotonic() - began:.1f}s)"
        )
        yield Homelab(hosts, folder, spec, ssh_config, ca[0], result, changes, notes)


@pytest.mark.timeout(900)
def test_the_homelab_example_deploys(homelab: Homelab, note: Callable[[str], None]) -> None:
    """The example as it is (but ``ops@`` → ``root@``) is applied on every host; each worker runs on the GPU its
    plan names, from the image the spec pins."""
    for line in homelab.changes:
        note(f"homelab: the example's one change: {line.strip()}")
    note(
        "homelab: why ops@ -> root@: the test hosts let only root in and have no sudo; on a real host deploy "
        "becomes root through sudo for a non-root user such as the example's `ops` (controller/deploy/ansible.py)"
    )
    note(
        "homelab: STAND-INS: GPUs are fake (CDI, the example's UUIDs, no memory); vLLM is the vLLM double; "
        "llama.cpp a newer llama-server with b6800's --model-url meaning; acme-v02.api.letsencrypt.org, "
        "huggingface.co and ntfy.example.org are one test host (Caddy's ACME server, a tiny random-weight GGUF at "
        "the spec's URL path, a 200) trusted through a test CA; the project's images preloaded on the hosts"
    )
    for line in homelab.notes:
        note(f"homelab: {line}")
    assert all(line.startswith(("-    ssh: ops@", "+    ssh: root@")) for line in homelab.changes), homelab.changes
    assert len(homelab.changes) == 6, homelab.changes
    result = homelab.result
    assert result.rc == 0, f"{result.stderr[-4000:]}\n{json.dumps(result.out, indent=1)[-3000:]}"
    assert {h: result.host(h)["result"] for h in ("gateway", "tower", "den")} == dict.fromkeys(
        ("gateway", "tower", "den"), "applied"
    )
    plan = make_plan(load_spec(homelab.spec))
    for worker in plan.workers:
        host = homelab.hosts[worker.host]
        name = f"fleet-{worker.name}"
        (info,) = json.loads(host.run(f"podman inspect {name}").stdout)
        assert info["State"]["Running"], (name, info["State"])
        assert info["ImageName"] == (plan.fleet.images.vllm if worker.backend == "vllm" else plan.fleet.images.llamacpp)
        (gpu,) = worker.gpus
        (fake,) = [g for g in host.gpus if g.uuid == gpu.uuid]
        devices = host.run(f"podman exec {name} ls /dev").stdout.split()
        assert [d for d in devices if d.startswith("nvidia")] == [fake.container_path.removeprefix("/dev/")], devices
        # what the CDI spec set for the program (the container's first process), as NVIDIA's toolkit does
        env = host.run(f"podman exec {name} cat /proc/1/environ").stdout.split("\0")
        assert f"NVIDIA_VISIBLE_DEVICES={gpu.uuid}" in env, env


@pytest.mark.timeout(300)
def test_the_gateway_has_its_certificate_by_acme(homelab: Homelab, note: Callable[[str], None]) -> None:
    """`tls.mode: acme` as rendered: Caddy registered with the example's e-mail at Let's Encrypt's directory URL,
    passed the HTTP-01 challenge on the gateway's port 80, and Envoy serves that certificate on 443."""
    gateway = homelab.hosts["gateway"]
    data = gateway.run("podman volume inspect fleet-caddy-data --format '{{.Mountpoint}}'").stdout.strip()
    name = "llm.example.org"
    deadline = time.monotonic() + 120
    while gateway.run(f"test -s {data}/caddy/certificates/{ACME_FOLDER}/{name}/{name}.crt", check=False).returncode:
        if time.monotonic() > deadline:
            logs = gateway.run("podman logs --tail 30 fleet-caddy", check=False).stderr[-3000:]
            pytest.fail(f"Caddy got no certificate from {ACME_NAME}: {logs}")
        time.sleep(1)
    account = gateway.run(f"cat {data}/caddy/acme/{ACME_FOLDER}/users/admin@example.org/admin.json", check=False)
    assert '"mailto:admin@example.org"' in account.stdout, account
    context = ssl.create_default_context(cafile=str(homelab.ca))
    deadline = time.monotonic() + 60
    while True:  # the gatekeeper publishes it to Envoy within a second of Caddy storing it
        try:
            with (
                socket.create_connection((gateway.address, 443), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=name) as tls,
            ):
                served = tls.getpeercert()
            break
        except (OSError, ssl.SSLError) as exc:
            if time.monotonic() > deadline:
                envoy = gateway.run("podman logs fleet-envoy", check=False)
                rejected = [x for x in (envoy.stdout + envoy.stderr).splitlines() if "rejected" in x]
                pytest.fail(f"Envoy does not serve {name} on {gateway.address}:443 ({exc}); its rejections: {rejected}")
            time.sleep(1)
    assert served is not None
    rdns: Any = served["issuer"]  # ((("commonName", "..."),), ...)
    issuer = {str(k): str(v) for rdn in rdns for k, v in rdn}
    note(
        f"homelab: Envoy serves {name}'s certificate issued by ACME ({issuer.get('commonName')}), tls.mode acme as in the example"
    )


@pytest.mark.timeout(300)
def test_the_family_uses_it_with_the_openai_sdk(homelab: Homelab, note: Callable[[str], None]) -> None:
    gateway = homelab.hosts["gateway"]
    out = gateway.run(
        "podman exec fleet-gatekeeper controller keys create --user alex --spec /etc/fleet/spec/fleet.yaml "
        "--state-dir /var/lib/fleet --json"
    ).stdout
    key = json.loads(out)["key"]
    http = gateway_client(gateway.address, homelab.ca, name="llm.example.org")
    alex = openai.OpenAI(base_url=f"https://{gateway.address}/v1", api_key=key, http_client=http, max_retries=0)
    with alex:
        reply = first_reply(alex, "llama", timeout=120)
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        code = alex.chat.completions.create(
            model="coder", messages=[{"role": "user", "content": "a haiku about tabs"}], max_tokens=8
        )
        assert code.choices[0].message.content
        emb = alex.embeddings.create(model="nomic-embed", input="hello")
        assert len(emb.data[0].embedding) > 0
    # The embedding model came from its URL: the worker downloaded it into its cache volume, on the host the plan
    # put it on.
    (embed,) = make_plan(load_spec(homelab.spec)).workers_of("nomic-embed")
    host = homelab.hosts[embed.host]
    cache = host.run("podman volume inspect fleet-llamacpp-cache --format '{{.Mountpoint}}'").stdout.strip()
    listing = host.run(f"ls {cache}").stdout.split()
    assert "nomic-embed-text-v1.5.Q8_0.gguf" in listing, listing
    note("homelab: chat on llama and coder (vLLM double), embedding on nomic-embed (llama.cpp, downloaded by URL)")
