"""The certificate Envoy serves: found where Caddy (or the operator) keeps it, handed to Envoy over file SDS.

Envoy terminates TLS for the public port; Caddy only obtains and renews the
certificate (ACME or its internal CA), and in `files` mode the operator's
files are the source. The publisher copies the current certificate chain
and key into one SDS file (``sds.yaml`` in the TLS folder Envoy watches),
written atomically (0600, then a rename into the folder, which is what
Envoy's `watched_directory` reacts to) and only when its content changes.
A renewal reaches Envoy within one check interval, without a restart and
without dropping a connection.

Nothing half-read is ever published: the chain and key must both parse,
belong together, and the chain must not have expired; otherwise the last
good certificate stays in place and the reason is logged.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.atomic import write_file

SECRET_NAME = "public"
SDS_FILE = "sds.yaml"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class CertError(Exception):
    pass


@dataclass(frozen=True)
class Source:
    """Where the certificate comes from: explicit files, or Caddy's storage for ``name``."""

    cert_file: Path | None = None
    key_file: Path | None = None
    caddy_data: Path | None = None  # Caddy's data folder (its `caddy/` storage inside)
    name: str = ""

    def locate(self) -> tuple[Path, Path]:
        if self.cert_file is not None and self.key_file is not None:
            return self.cert_file, self.key_file
        if self.caddy_data is None:
            raise CertError("no certificate source configured")
        # certificates/<issuer>/<name>/<name>.crt; the issuer folder depends on the CA (internal, Let's Encrypt, …):
        # take the one that lasts longest.
        found = sorted(
            self.caddy_data.glob(f"caddy/certificates/*/{self.name}/{self.name}.crt"),
            key=_not_after_or_zero,
            reverse=True,
        )
        if not found:
            raise CertError(f"Caddy has not issued a certificate for {self.name} yet (in {self.caddy_data})")
        return found[0], found[0].with_suffix(".key")


def _not_after_or_zero(path: Path) -> float:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0].not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return 0.0


def empty_sds() -> str:
    """The SDS file before any certificate: Envoy starts, and its TLS listener waits for the secret."""
    return "resources: []\n"


def sds_document(chain_pem: bytes, key_pem: bytes) -> str:
    """The SDS file for a chain and key, checked first (raises CertError)."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise CertError(f"unreadable certificate or key: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if chain[0].public_key().public_bytes(der, public) != key.public_key().public_bytes(der, public):
        raise CertError("the key does not belong to the certificate (a renewal caught half-written?)")
    if chain[0].not_valid_after_utc <= datetime.now(UTC):
        raise CertError(f"the certificate expired at {chain[0].not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    secret = {
        "@type": SECRET_TYPE,
        "name": SECRET_NAME,
        "tls_certificate": {
            "certificate_chain": {"inline_string": chain_pem.decode()},
            "private_key": {"inline_string": key_pem.decode()},
        },
    }
    return yaml.safe_dump({"resources": [secret]}, sort_keys=False)


def publish(source: Source, tls_dir: Path) -> bool:
    """Write the current certificate for Envoy if it changed; True when a new one was written."""
    cert_path, key_path = source.locate()
    try:
        document = sds_document(cert_path.read_bytes(), key_path.read_bytes())
    except OSError as exc:
        raise CertError(f"cannot read {exc.filename}: {exc.strerror}") from None
    target = tls_dir / SDS_FILE
    try:
        if target.read_bytes() == document.encode():
            return False
    except OSError:
        pass
    tls_dir.mkdir(parents=True, exist_ok=True)
    write_file(target, document, mode=0o600)
    return True


def ensure_sds_file(tls_dir: Path) -> None:
    """Envoy refuses to start without the file it watches: an empty one until the first certificate."""
    target = tls_dir / SDS_FILE
    if not target.exists():
        tls_dir.mkdir(parents=True, exist_ok=True)
        write_file(target, empty_sds(), mode=0o600)


class Publisher:
    """Publishes at start, every ``interval_s`` after, and every 0.5 s until the first certificate exists."""

    def __init__(self, source: Source, tls_dir: Path, interval_s: float = 30.0) -> None:
        self.source = source
        self.tls_dir = tls_dir
        self.interval_s = interval_s
        self.published = threading.Event()
        self._stop = threading.Event()
        self._last_error = ""

    def check(self) -> None:
        try:
            if publish(self.source, self.tls_dir):
                print(f"certificate published for Envoy ({self.tls_dir / SDS_FILE})", flush=True)
            self.published.set()
            self._last_error = ""
        except CertError as exc:
            if str(exc) != self._last_error:  # say it once, not every interval
                print(f"certificate not published: {exc}", flush=True)
                self._last_error = str(exc)

    def run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s if self.published.is_set() else 0.5)

    def start(self) -> Publisher:
        ensure_sds_file(self.tls_dir)  # before the gatekeeper answers its health check: Envoy starts after that
        threading.Thread(target=self.run, name="certs", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def served_certificate(address: str, port: int, name: str, timeout_s: float = 2) -> x509.Certificate | None:
    """The certificate a TLS port presents for ``name``, or None when it completes no handshake.

    Read, never trusted: no verification, for expiry checks and readiness only.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((address, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=name) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except OSError:
        return None
    return x509.load_der_x509_certificate(der) if der else None


def wait_published(tls_dir: Path, timeout_s: float) -> bool:
    """True once the SDS file holds a certificate (for `controller up` to wait on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if "tls_certificate" in (tls_dir / SDS_FILE).read_text(encoding="utf-8"):
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
