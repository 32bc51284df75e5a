"""Publishing the certificate Envoy serves: only whole, matching, current pairs; atomically; only on change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from controller.gateway.certs import SDS_FILE, CertError, Source, ensure_sds_file, publish, wait_published
from tests.helpers import self_signed


def pair(folder: Path, name: str = "localhost", days: float = 1) -> Source:
    folder.mkdir(parents=True, exist_ok=True)
    chain, key = self_signed(name, days=days)
    (folder / "cert.pem").write_bytes(chain)
    (folder / "key.pem").write_bytes(key)
    return Source(folder / "cert.pem", folder / "key.pem")


def test_publish_writes_a_private_sds_file_once_per_change(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    ensure_sds_file(tls)
    assert not wait_published(tls, 0.1)  # the empty file Envoy starts with holds no certificate
    source = pair(tmp_path / "a")
    assert publish(source, tls)
    document = yaml.safe_load((tls / SDS_FILE).read_text())
    (secret,) = document["resources"]
    assert secret["name"] == "public"
    assert secret["tls_certificate"]["certificate_chain"]["inline_string"] == source.cert_file.read_text()  # type: ignore[union-attr]
    assert oct((tls / SDS_FILE).stat().st_mode & 0o777) == "0o600"
    assert wait_published(tls, 0.1)
    assert not publish(source, tls)  # same pair: nothing rewritten, Envoy not poked
    assert publish(pair(tmp_path / "a"), tls)  # renewed in place: published again


@pytest.mark.parametrize("problem", ["mismatched", "expired", "truncated", "missing"])
def test_a_bad_pair_is_refused_and_the_last_good_one_stays(tmp_path: Path, problem: str) -> None:
    tls = tmp_path / "tls"
    good = pair(tmp_path / "good")
    publish(good, tls)
    before = (tls / SDS_FILE).read_bytes()
    bad = pair(tmp_path / "bad", days=-1 if problem == "expired" else 1)
    assert bad.cert_file is not None and bad.key_file is not None
    if problem == "mismatched":
        _, other_key = self_signed("localhost", key=ec.generate_private_key(ec.SECP256R1()))
        bad.key_file.write_bytes(other_key)
    elif problem == "truncated":
        bad.cert_file.write_bytes(bad.cert_file.read_bytes()[:200])
    elif problem == "missing":
        bad.key_file.unlink()
    with pytest.raises(CertError):
        publish(bad, tls)
    assert (tls / SDS_FILE).read_bytes() == before


def test_caddy_storage_the_longest_lasting_issuer_wins(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(CertError, match="has not issued"):
        Source(caddy_data=data, name="llm.example.org").locate()
    for issuer, days in (("local", 0.5), ("acme-v02.api.letsencrypt.org-directory", 60)):
        folder = data / "caddy" / "certificates" / issuer / "llm.example.org"
        folder.mkdir(parents=True)
        chain, key = self_signed("llm.example.org", days=days)
        (folder / "llm.example.org.crt").write_bytes(chain)
        (folder / "llm.example.org.key").write_bytes(key)
    cert, key_path = Source(caddy_data=data, name="llm.example.org").locate()
    assert "letsencrypt" in str(cert) and key_path == cert.with_suffix(".key")
