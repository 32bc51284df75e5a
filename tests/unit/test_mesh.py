"""`controller mesh`: WireGuard keys made once and kept, configs with public keys only, the peer rules, errors."""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.errors import ControllerError, SpecError
from controller.mesh import (
    KEEPALIVE_S,
    PRIVATE_KEY_PATH,
    MeshKeyError,
    ensure_keys,
    ensure_keys_report,
    host_sync_command,
    mesh_configs,
    mesh_problems,
    private_key_file,
    public_key,
    read_private_key,
    syncconf_text,
    unreachable_pairs,
)
from controller.mesh.wireguard import generate_private_key, key_dir, public_key_file
from controller.spec.models import Fleet
from tests.conftest import ROOT, need_tool
from tests.helpers import MINIMAL

HOMELAB = ROOT / "examples" / "homelab.yaml"


def spec_data(endpoints: dict[str, str | None] | None = None, **mesh: Any) -> dict[str, Any]:
    """MINIMAL on a three-host WireGuard mesh: gw (the gateway, 10.77.0.1), n1 (.2), n2 (.3)."""
    data = copy.deepcopy(MINIMAL)
    ends: dict[str, str | None] = {"gw": "gw.example.net:51820", "n1": "n1.example.net", "n2": "n2.example.net:4000"}
    ends.update(endpoints or {})
    first = data["hosts"][0]
    first["name"] = "gw"
    first["address"] = "10.77.0.1"
    hosts = [first, {"name": "n2", "address": "10.77.0.3"}, {"name": "n1", "address": "10.77.0.2"}]
    for h in hosts:
        if ends.get(h["name"]):
            h["endpoint"] = ends[h["name"]]
    data["hosts"] = hosts
    data["mesh"] = {"kind": "wireguard", "subnet": "10.77.0.0/24", **mesh}
    data["gateway"]["host"] = "gw"
    return data


def fleet(data: dict[str, Any] | None = None) -> Fleet:
    """The spec model alone (no cross-reference checks), so meshes the loader would refuse can be tried too."""
    return Fleet.model_validate(data or spec_data())


def parse_conf(text: str) -> list[tuple[str, dict[str, str]]]:
    """Sections of a WireGuard config, in order: (name, {key: value}), comments dropped."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append((line, {}))
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        assert key not in sections[-1][1], f"{key} twice in a section"
        sections[-1][1][key] = value
    return sections


def peers_of(text: str) -> dict[str, dict[str, str]]:
    """The [Peer] sections keyed by AllowedIPs."""
    return {s["AllowedIPs"]: s for name, s in parse_conf(text) if name == "[Peer]"}


# -- keys ------------------------------------------------------------------------------


def test_keys_made_once_and_reused(tmp_path: Path) -> None:
    f = fleet()
    first = ensure_keys_report(tmp_path, f)
    assert sorted(first.public_keys) == ["gw", "n1", "n2"]
    assert first.generated == ["gw", "n1", "n2"]
    assert len(set(first.public_keys.values())) == 3
    privates = {h: read_private_key(tmp_path, "t", h) for h in first.public_keys}
    second = ensure_keys_report(tmp_path, f)
    assert second.public_keys == first.public_keys
    assert second.generated == []
    assert {h: read_private_key(tmp_path, "t", h) for h in first.public_keys} == privates
    assert ensure_keys(tmp_path, f) == first.public_keys


def test_key_files_modes_and_format(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path, fleet())
    folder = key_dir(tmp_path, "t")
    assert folder == tmp_path / "mesh" / "t"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    for host, pub in keys.items():
        key_path = private_key_file(tmp_path, "t", host)
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        text = key_path.read_text(encoding="ascii")
        assert text.endswith("\n") and len(text.strip()) == 44
        raw = base64.b64decode(text.strip(), validate=True)
        assert len(raw) == 32
        assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40, "private key is not clamped"
        assert public_key_file(tmp_path, "t", host).read_text(encoding="ascii") == pub + "\n"
        assert public_key(text) == pub
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{h}.{e}" for h in keys for e in ("key", "pub"))


def test_public_key_matches_wg_pubkey(tmp_path: Path) -> None:
    wg = need_tool("wg", "apt-get install wireguard-tools")
    keys = ensure_keys(tmp_path, fleet())
    for host, pub in keys.items():
        private = private_key_file(tmp_path, "t", host).read_text(encoding="ascii")
        result = subprocess.run([wg, "pubkey"], input=private, capture_output=True, text=True, check=True, timeout=10)
        assert result.stdout.strip() == pub
    # And the other way: a key `wg genkey` made is read the same.
    made = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout
    theirs = subprocess.run([wg, "pubkey"], input=made, capture_output=True, text=True, check=True, timeout=10)
    assert public_key(made) == theirs.stdout.strip()


def test_generated_key_is_what_wg_genkey_makes() -> None:
    for _ in range(20):
        key = generate_private_key()
        raw = base64.b64decode(key, validate=True)
        assert len(key) == 44 and key.endswith("=") and len(raw) == 32
        assert raw[0] & 7 == 0 and raw[31] >> 6 == 1


def test_key_with_wrong_mode_is_an_error(tmp_path: Path) -> None:
    ensure_keys(tmp_path, fleet())
    key_path = private_key_file(tmp_path, "t", "n1")
    secret = key_path.read_text(encoding="ascii").strip()
    os.chmod(key_path, 0o644)
    with pytest.raises(MeshKeyError) as err:
        ensure_keys(tmp_path, fleet())
    assert str(key_path) in err.value.message and "chmod 600" in err.value.message
    assert secret not in err.value.message
    assert err.value.exit_code == 4


def test_key_folder_with_wrong_mode_is_an_error(tmp_path: Path) -> None:
    ensure_keys(tmp_path, fleet())
    folder = key_dir(tmp_path, "t")
    os.chmod(folder, 0o755)
    with pytest.raises(MeshKeyError, match="chmod 700"):
        ensure_keys(tmp_path, fleet())


@pytest.mark.parametrize("content", ["not a key\n", base64.b64encode(b"x" * 31).decode() + "\n", ""])
def test_unparsable_key_is_an_error_that_quotes_nothing(tmp_path: Path, content: str) -> None:
    folder = key_dir(tmp_path, "t")
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(folder.parent, 0o700)
    key_path = folder / "gw.key"
    key_path.write_text(content, encoding="ascii")
    os.chmod(key_path, 0o600)
    with pytest.raises(MeshKeyError) as err:
        ensure_keys(tmp_path, fleet())
    assert "not a WireGuard private key" in err.value.message and str(key_path) in err.value.message
    if content.strip():
        assert content.strip() not in err.value.message
    assert key_path.read_text(encoding="ascii") == content, "a bad key file must be left for the user, not replaced"


def test_rotate_replaces_one_host_only(tmp_path: Path) -> None:
    before = ensure_keys(tmp_path, fleet())
    report = ensure_keys_report(tmp_path, fleet(), rotate=["n1"])
    assert report.generated == ["n1"]
    assert report.public_keys["n1"] != before["n1"]
    assert {h: k for h, k in report.public_keys.items() if h != "n1"} == {h: k for h, k in before.items() if h != "n1"}
    assert stat.S_IMODE(private_key_file(tmp_path, "t", "n1").stat().st_mode) == 0o600
    with pytest.raises(SpecError, match="nope"):
        ensure_keys(tmp_path, fleet(), rotate=["nope"])


def test_other_meshes_need_no_keys_and_render_nothing(tmp_path: Path) -> None:
    data = spec_data()
    data["mesh"] = {"kind": "tailscale"}
    for h in data["hosts"]:
        h.pop("endpoint", None)
    f = fleet(data)
    assert ensure_keys(tmp_path, f) == {}
    assert mesh_configs(f, {}) == {}
    assert not (tmp_path / "mesh").exists()


# -- configs ---------------------------------------------------------------------------


def test_config_per_host_with_peers_and_endpoints(tmp_path: Path) -> None:
    f = fleet(spec_data(listen_port=51999, interface="wgx"))
    keys = ensure_keys(tmp_path, f)
    files = mesh_configs(f, keys)
    assert list(files) == ["gw/wireguard/wgx.conf", "n1/wireguard/wgx.conf", "n2/wireguard/wgx.conf"]
    gw = files["gw/wireguard/wgx.conf"]
    assert gw.startswith("# Rendered by controller mesh; do not edit")
    sections = parse_conf(gw)
    assert [name for name, _ in sections] == ["[Interface]", "[Peer]", "[Peer]"]
    assert sections[0][1] == {
        "Address": "10.77.0.1/24",
        "ListenPort": "51999",
        "PostUp": f"wg set %i private-key {PRIVATE_KEY_PATH}",
    }
    assert PRIVATE_KEY_PATH == "/etc/fleet/secrets/wireguard.key"
    # Peers by host name: n1 then n2; n1's endpoint has no port, so the mesh's listen port is added.
    assert sections[1][1] == {
        "PublicKey": keys["n1"],
        "AllowedIPs": "10.77.0.2/32",
        "Endpoint": "n1.example.net:51999",
    }
    assert sections[2][1] == {"PublicKey": keys["n2"], "AllowedIPs": "10.77.0.3/32", "Endpoint": "n2.example.net:4000"}
    n2 = peers_of(files["n2/wireguard/wgx.conf"])
    assert set(n2) == {"10.77.0.1/32", "10.77.0.2/32"}
    assert n2["10.77.0.1/32"]["Endpoint"] == "gw.example.net:51820"
    assert all("PersistentKeepalive" not in p for text in files.values() for p in peers_of(text).values()), (
        "hosts with an endpoint send no keepalives"
    )
    # Each host's own key is never its own peer, and every file is the same on a second render.
    for path, text in files.items():
        host = path.split("/")[0]
        assert keys[host] not in {p["PublicKey"] for p in peers_of(text).values()}
    assert mesh_configs(f, ensure_keys(tmp_path, f)) == files


def test_no_private_key_in_any_rendered_file(tmp_path: Path) -> None:
    f = fleet()
    files = mesh_configs(f, ensure_keys(tmp_path, f))
    secrets = [read_private_key(tmp_path, "t", h) for h in ("gw", "n1", "n2")]
    for text in files.values():
        assert "PrivateKey" not in text
        for secret in secrets:
            assert secret not in text
            assert secret not in syncconf_text(text)


def test_host_behind_nat_keeps_its_mappings_open(tmp_path: Path) -> None:
    f = fleet(spec_data(endpoints={"n2": None}))
    keys = ensure_keys(tmp_path, f)
    files = mesh_configs(f, keys)
    n2 = peers_of(files["n2/wireguard/fleet0.conf"])
    assert n2["10.77.0.1/32"]["PersistentKeepalive"] == str(KEEPALIVE_S) == "25"
    assert n2["10.77.0.2/32"]["PersistentKeepalive"] == "25"
    assert n2["10.77.0.2/32"]["Endpoint"] == "n1.example.net:51820"
    for host in ("gw", "n1"):
        peer = peers_of(files[f"{host}/wireguard/fleet0.conf"])["10.77.0.3/32"]
        assert peer == {"PublicKey": keys["n2"], "AllowedIPs": "10.77.0.3/32"}, "n2 dials in: no Endpoint to dial"
        others = [p for ip, p in peers_of(files[f"{host}/wireguard/fleet0.conf"]).items() if ip != "10.77.0.3/32"]
        assert all("PersistentKeepalive" not in p for p in others)
    assert unreachable_pairs(f) == []


def test_two_hosts_behind_nat_are_reported_as_a_pair() -> None:
    f = fleet(spec_data(endpoints={"n1": None, "n2": None}))
    assert mesh_problems(f) == []
    assert unreachable_pairs(f) == [("n1", "n2")]


def test_syncconf_text_drops_wg_quick_keys_only(tmp_path: Path) -> None:
    f = fleet(spec_data(endpoints={"gw": None}))
    conf = mesh_configs(f, ensure_keys(tmp_path, f))["gw/wireguard/fleet0.conf"]
    stripped = syncconf_text(conf)
    sections = parse_conf(stripped)
    assert sections[0] == ("[Interface]", {"ListenPort": "51820"})
    assert [s for s in sections[1:]] == [s for s in parse_conf(conf)[1:]]
    assert "Address" not in stripped and "PostUp" not in stripped
    # A key of the same name in a [Peer] section is not wg-quick's, and stays.
    odd = "[Interface]\nMTU = 1400\nListenPort = 1\n[Peer]\nPublicKey = x\nDNS = 1.1.1.1\n"
    assert syncconf_text(odd) == "[Interface]\nListenPort = 1\n[Peer]\nPublicKey = x\nDNS = 1.1.1.1\n"


def test_syncconf_text_is_what_wg_quick_strip_prints(tmp_path: Path) -> None:
    wg_quick = need_tool("wg-quick", "apt-get install wireguard-tools")
    f = fleet(spec_data(endpoints={"n1": None}))
    for rel, conf in mesh_configs(f, ensure_keys(tmp_path, f)).items():
        path = tmp_path / "out" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(conf, encoding="utf-8")
        os.chmod(path, 0o600)
        result = subprocess.run([wg_quick, "strip", str(path)], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        # wg-quick prints its text with `echo`, which adds one newline after the file's last one.
        assert result.stdout == syncconf_text(conf) + "\n"


def test_wg_accepts_the_stripped_config(tmp_path: Path) -> None:
    """`wg` parses the stripped form as a config (it refuses unknown keys such as Address), without a device."""
    wg = need_tool("wg", "apt-get install wireguard-tools")
    f = fleet()
    conf = mesh_configs(f, ensure_keys(tmp_path, f))["n1/wireguard/fleet0.conf"]
    path = tmp_path / "n1.conf"
    path.write_text(syncconf_text(conf), encoding="utf-8")
    # `wg setconf` on an interface that does not exist parses the file first: a parse error names the line,
    # a good file gets as far as the missing device.
    result = subprocess.run(
        [wg, "setconf", "fm-no-such-if", str(path)], capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode != 0
    assert "Line unrecognized" not in result.stderr and "Unable to parse" not in result.stderr, result.stderr
    path.write_text(conf, encoding="utf-8")
    unstripped = subprocess.run(
        [wg, "setconf", "fm-no-such-if", str(path)], capture_output=True, text=True, timeout=10, check=False
    )
    assert "Line unrecognized" in unstripped.stderr, unstripped.stderr


# -- errors ----------------------------------------------------------------------------


def messages(data: dict[str, Any]) -> list[str]:
    return [f"{p.path}: {p.message}" for p in mesh_problems(fleet(data))]


def test_no_endpoint_anywhere_is_unreachable() -> None:
    found = messages(spec_data(endpoints={"gw": None, "n1": None, "n2": None}))
    assert len(found) == 3
    for i, name in enumerate(["gw", "n2", "n1"]):
        assert any(m.startswith(f"hosts[{i}].endpoint: host {name}: unreachable") for m in found), found
    with pytest.raises(SpecError) as err:
        mesh_configs(fleet(spec_data(endpoints={"gw": None, "n1": None, "n2": None})), {})
    assert len(err.value.lines()) == 3 and err.value.exit_code == 2


def test_gateway_and_a_worker_both_behind_nat_is_an_error() -> None:
    found = messages(spec_data(endpoints={"gw": None, "n2": None}))
    assert found == [
        "hosts[0].endpoint: host gw: the gateway and n2 all lack `endpoint`, so the gateway cannot reach them; "
        "give the gateway (or them) a public host[:port]"
    ]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.78.0.9", "outside the mesh subnet 10.77.0.0/24"),
        ("10.77.0.0", "is the network address of 10.77.0.0/24"),
        ("10.77.0.255", "is the broadcast address of 10.77.0.0/24"),
        ("10.77.0.1", "already host gw's"),
        ("fd00::1", "outside the mesh subnet"),
    ],
)
def test_bad_addresses(address: str, expected: str) -> None:
    data = spec_data()
    data["hosts"][1]["address"] = address
    found = messages(data)
    assert len(found) == 1 and found[0].startswith("hosts[1].address: host n2:") and expected in found[0], found


def test_missing_public_key_is_an_error() -> None:
    f = fleet()
    with pytest.raises(MeshKeyError, match="no public key for host"):
        mesh_configs(f, {"gw": base64.b64encode(bytes(32)).decode()})
    with pytest.raises(ControllerError, match="host gw: public key is not a WireGuard key"):
        mesh_configs(f, {"gw": "nope", "n1": "nope", "n2": "nope"})


# -- the command -----------------------------------------------------------------------


def run_mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_cli_json_writes_configs_and_keeps_keys(tmp_path: Path) -> None:
    spec = write(tmp_path / "fleet.yaml", spec_data())
    state, out = tmp_path / "state", tmp_path / "rendered"
    first = run_mesh(str(spec), "--state-dir", str(state), "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["generated"] == ["gw", "n1", "n2"]
    assert data["files"] == [f"{h}/wireguard/fleet0.conf" for h in ("gw", "n1", "n2")]
    assert data["key_folder"] == str(state / "mesh" / "t")
    hosts = {h["name"]: h for h in data["hosts"]}
    assert hosts["n1"]["address"] == "10.77.0.2/24" and hosts["n1"]["interface"] == "fleet0"
    assert [p["name"] for p in hosts["n1"]["peers"]] == ["gw", "n2"]
    assert hosts["n1"]["peers"][1]["endpoint"] == "n2.example.net:4000"
    for name, h in hosts.items():
        conf = Path(h["config"])
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert h["public_key"] == public_key_file(state, "t", name).read_text(encoding="ascii").strip()
        assert f"PublicKey = {h['public_key']}" not in conf.read_text(encoding="utf-8")
    secrets = [read_private_key(state, "t", h) for h in hosts]
    text = run_mesh(str(spec), "--state-dir", str(state), "--out", str(out))
    assert text.returncode == 0, text.stderr
    assert "keys in " in text.stdout and "none made, 3 kept" in text.stdout
    assert f"n1: fleet0 10.77.0.2/24 port 51820 public key {hosts['n1']['public_key']}" in text.stdout
    again = run_mesh(str(spec), "--state-dir", str(state), "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["generated"] == [] and json.loads(again.stdout)["changed"] == []
    assert {h["name"]: h["public_key"] for h in json.loads(again.stdout)["hosts"]} == {
        n: h["public_key"] for n, h in hosts.items()
    }
    rendered = [p.read_text(encoding="utf-8") for p in out.rglob("*") if p.is_file()]
    for secret in secrets:
        for result in (first, text, again):
            assert secret not in result.stdout and secret not in result.stderr
        assert all(secret not in r for r in rendered)


def test_cli_removes_the_config_of_a_removed_host(tmp_path: Path) -> None:
    data = spec_data()
    spec = write(tmp_path / "fleet.yaml", data)
    state, out = tmp_path / "state", tmp_path / "rendered"
    assert run_mesh(str(spec), "--state-dir", str(state), "--out", str(out)).returncode == 0
    other = out / "gw" / "compose.yaml"  # a file `controller render` wrote beside the mesh's: left alone
    other.write_text("x\n", encoding="utf-8")
    data["hosts"] = [h for h in data["hosts"] if h["name"] != "n2"]
    write(spec, data)
    result = run_mesh(str(spec), "--state-dir", str(state), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == ["n2/wireguard/fleet0.conf"]
    assert not (out / "n2" / "wireguard" / "fleet0.conf").exists()
    assert other.read_text(encoding="utf-8") == "x\n"
    assert "10.77.0.3" not in (out / "gw" / "wireguard" / "fleet0.conf").read_text(encoding="utf-8")


def test_cli_bad_key_is_one_line_without_traceback(tmp_path: Path) -> None:
    spec = write(tmp_path / "fleet.yaml", spec_data())
    state = tmp_path / "state"
    assert run_mesh(str(spec), "--state-dir", str(state), "--out", str(tmp_path / "o")).returncode == 0
    os.chmod(private_key_file(state, "t", "gw"), 0o640)
    result = run_mesh(str(spec), "--state-dir", str(state), "--out", str(tmp_path / "o"))
    assert result.returncode == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "chmod 600" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bad_spec_exits_2_and_makes_no_keys(tmp_path: Path) -> None:
    data = spec_data()
    data["hosts"][2]["address"] = "10.99.0.2"
    spec = write(tmp_path / "fleet.yaml", data)
    result = run_mesh(str(spec), "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    assert "address 10.99.0.2 is outside the mesh subnet 10.77.0.0/24" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "mesh").exists()


def test_cli_other_mesh_says_addresses_are_used_as_they_are(tmp_path: Path) -> None:
    spec = ROOT / "examples" / "team.yaml"
    result = run_mesh(str(spec), "--state-dir", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rendered"] is False and data["kind"] == "tailscale"
    assert "declared addresses are used as they are" in data["message"] and data["hosts"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_cli_homelab_example(tmp_path: Path) -> None:
    result = run_mesh(str(HOMELAB), "--state-dir", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    hosts = {h["name"]: h for h in json.loads(result.stdout)["hosts"]}
    assert sorted(hosts) == ["den", "gateway", "tower"]
    assert [p["endpoint"] for p in hosts["gateway"]["peers"]] == ["den.home.arpa:51820", "tower.home.arpa:51820"]


def test_syncconf_text_with_the_key_keeps_it_for_a_live_update(tmp_path: Path) -> None:
    f = fleet()
    keys = ensure_keys(tmp_path, f)
    conf = mesh_configs(f, keys)["n1/wireguard/fleet0.conf"]
    secret = read_private_key(tmp_path, "t", "n1")
    text = syncconf_text(conf, private_key=secret)
    assert text.startswith(f"[Interface]\nPrivateKey = {secret}\n")
    assert text.endswith(syncconf_text(conf)) and text.count(secret) == 1
    with pytest.raises(ValueError):
        syncconf_text(conf, private_key="nope")


def test_host_sync_command_reads_the_key_on_the_host(tmp_path: Path) -> None:
    f = fleet()
    keys = ensure_keys(tmp_path, f)
    conf = mesh_configs(f, keys)["gw/wireguard/fleet0.conf"]
    stripped = tmp_path / "gw.sync"
    stripped.write_text(syncconf_text(conf), encoding="utf-8")
    command = host_sync_command("fleet0", str(stripped))
    assert PRIVATE_KEY_PATH in command and read_private_key(tmp_path, "t", "gw") not in command
    # Run it with a stand-in `wg` that prints the file it was given: the key first, then the stripped config.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wg").write_text('#!/bin/sh\n[ "$1 $2" = "syncconf fleet0" ] && cat "$3"\n', encoding="utf-8")
    os.chmod(bin_dir / "wg", 0o755)
    key_path = private_key_file(tmp_path, "t", "gw")
    result = subprocess.run(
        ["sh", "-c", host_sync_command("fleet0", str(stripped), str(key_path))],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    secret = read_private_key(tmp_path, "t", "gw")
    assert result.stdout == f"[Interface]\nPrivateKey = {secret}\n" + syncconf_text(conf)
    with pytest.raises(ValueError):
        host_sync_command("fleet0", "/tmp/it's")
