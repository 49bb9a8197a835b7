"""Real ACME servers for the certificate tests: pebble (the CA) and pebble-challtestsrv (its DNS).

Both are the Debian ``pebble`` package's binaries (``scripts/ensure-servers.sh`` installs it),
started on free loopback ports in a directory of the caller's (configs, certificates, logs),
through ``tests.support.processes.ReadyProcess`` (own process group, log file, readiness).

- challtestsrv is pebble's DNS server only: it answers every A query with 127.0.0.1 and AAAA
  with nothing (so pebble's VA dials only 127.0.0.1), and serves the TXT/CNAME records the
  tests set through its management API. Its own HTTP-01/TLS-ALPN-01/DoH servers are off: the
  HTTP-01 responder under test is ours.
- pebble validates HTTP-01 by fetching ``http://127.0.0.1:<http01_port>/.well-known/...``
  (its ``httpPort``), so ``start_pebble(..., http01_port=)`` is where our responder listens.
  The Debian package ships no certificates: the CA and the ``localhost``/127.0.0.1 certificate
  of pebble's HTTPS listener are made here with ``cryptography``; clients trust
  ``Pebble.ca_bundle``. The issuing root differs from that CA and is regenerated at every
  start: ``Pebble.root_pem()`` fetches it to check chains.

Pebble runs with ``PEBBLE_VA_NOSLEEP=1`` (no random 0-15 s validation delay),
``PEBBLE_WFE_NONCEREJECT=0`` (no random ``badNonce``) and ``PEBBLE_AUTHZREUSE=0`` (every order
gets fresh authorizations), so runs are deterministic.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.processes import ReadyProcess
from worker.local_server import free_port

__all__ = [
    "Challtestsrv",
    "Pebble",
    "start_acme_responder",
    "start_challtestsrv",
    "start_pebble",
]

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"


def _fqdn(host: str) -> str:
    """challtestsrv keys its records by FQDN with the trailing dot."""
    return host if host.endswith(".") else host + "."


@dataclass
class Challtestsrv:
    """A running pebble-challtestsrv: the DNS server pebble resolves through.

    Attributes:
        dns_host: the address its DNS server (UDP and TCP) listens on.
        dns_port: its port.
        management_url: the base URL of its management API (plain HTTP).
        process: the process.
    """

    dns_host: str
    dns_port: int
    management_url: str
    process: ReadyProcess

    @property
    def dns_address(self) -> str:
        """``host:port`` of the DNS server, as pebble's ``-dnsserver`` wants it."""
        return f"{self.dns_host}:{self.dns_port}"

    def _post(self, path: str, body: dict[str, Any]) -> None:
        response = httpx.post(f"{self.management_url}{path}", json=body, timeout=5.0)
        response.raise_for_status()

    def add_txt(self, fqdn: str, value: str) -> None:
        """Add a TXT value to ``fqdn`` (values accumulate; ``clear_txt`` removes them all)."""
        self._post("/set-txt", {"host": _fqdn(fqdn), "value": value})

    def clear_txt(self, fqdn: str) -> None:
        """Remove every TXT value of ``fqdn``."""
        self._post("/clear-txt", {"host": _fqdn(fqdn)})

    def add_cname(self, host: str, target: str) -> None:
        """Answer ``host`` with a CNAME to ``target``."""
        self._post("/set-cname", {"host": _fqdn(host), "target": _fqdn(target)})

    def clear_cname(self, host: str) -> None:
        """Remove the CNAME of ``host``."""
        self._post("/clear-cname", {"host": _fqdn(host)})

    def add_a(self, host: str, ip: str) -> None:
        """Answer A queries for ``host`` with ``ip`` (instead of the default 127.0.0.1)."""
        self._post("/add-a", {"host": _fqdn(host), "addresses": [ip]})

    def clear_a(self, host: str) -> None:
        """Back to the default A answer for ``host``."""
        self._post("/clear-a", {"host": _fqdn(host)})

    def ready(self) -> bool:
        """True when the management API answers (its ``/`` is a 404: a POST is the probe)."""
        response = httpx.post(
            f"{self.management_url}/dns-request-history", json={"host": "ready."}, timeout=1.0
        )
        return response.status_code == 200

    def stop(self) -> None:
        """Stop it (and whatever is left of its process group)."""
        self.process.stop(timeout=10)


def start_challtestsrv(directory: Path) -> Challtestsrv:
    """Start pebble-challtestsrv on free loopback ports, as a DNS server only.

    Args:
        directory: its working directory; its log is ``challtestsrv.log`` there.

    Returns:
        The running server, ready (its management API answers).

    Raises:
        tests.support.processes.ProcessNotReady: it exited or did not answer in 30 s.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # DNS listens on UDP and TCP; a free TCP port is almost always a free UDP one too.
    dns_port, management_port = free_port(), free_port()
    command = [
        CHALLTESTSRV,
        "-defaultIPv4", "127.0.0.1",
        "-defaultIPv6", "",
        "-dns01", f"127.0.0.1:{dns_port}",
        "-http01", "",
        "-https01", "",
        "-tlsalpn01", "",
        "-management", f"127.0.0.1:{management_port}",
    ]  # fmt: skip
    process = ReadyProcess(
        command,
        cwd=directory,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        log_path=directory / "challtestsrv.log",
        name="pebble-challtestsrv",
    )
    server = Challtestsrv("127.0.0.1", dns_port, f"http://127.0.0.1:{management_port}", process)
    process.start(ready=server.ready, timeout=30)
    return server


@dataclass
class Pebble:
    """A running pebble ACME server.

    Attributes:
        directory_url: its ACME directory (``https://127.0.0.1:<port>/dir``).
        ca_bundle: the PEM file of the CA its HTTPS listeners' certificate chains to.
        management_url: its management API (HTTPS, same CA).
        http01_port: the port its VA fetches HTTP-01 tokens from on 127.0.0.1.
        process: the process.
    """

    directory_url: str
    ca_bundle: Path
    management_url: str
    http01_port: int
    process: ReadyProcess

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts pebble's listeners (for httpx)."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def root_pem(self) -> str:
        """The PEM of the root pebble issues under (new at every start of pebble)."""
        response = httpx.get(f"{self.management_url}/roots/0", verify=self.ssl_context())
        response.raise_for_status()
        return response.text

    def worker_env(self) -> dict[str, str]:
        """A worker's (and its flow-run processes') ACME settings: this pebble, trusted."""
        return {
            "UNKEY_ACME_ENABLED": "true",
            "UNKEY_ACME_DIRECTORY_URL": self.directory_url,
            "UNKEY_ACME_CA_BUNDLE": str(self.ca_bundle),
            "UNKEY_ACME_EMAIL_DOMAIN": "example.test",
        }

    def settings_update(self) -> dict[str, Any]:
        """The same as ``worker_env``, as ``Settings`` fields (for ``model_copy(update=…)``)."""
        return {
            "acme_enabled": True,
            "acme_directory_url": self.directory_url,
            "acme_ca_bundle": self.ca_bundle,
            "acme_email_domain": "example.test",
        }

    def ready(self) -> bool:
        """True when its ACME directory answers 200."""
        return httpx.get(self.directory_url, verify=self.ssl_context(), timeout=1.0).is_success

    def stop(self) -> None:
        """Stop it (and whatever is left of its process group)."""
        self.process.stop(timeout=10)


def start_pebble(directory: Path, dns: Challtestsrv, http01_port: int) -> Pebble:
    """Make pebble's TLS certificates and config in ``directory`` and start it on free ports.

    Args:
        directory: its working directory (``ca.pem``, ``cert.pem``, ``key.pem``,
            ``pebble-config.json``, ``pebble.log``).
        dns: the challtestsrv pebble resolves every name through.
        http01_port: the port on 127.0.0.1 pebble's VA fetches HTTP-01 tokens from.

    Returns:
        The running server, ready (its directory answers over TLS).

    Raises:
        tests.support.processes.ProcessNotReady: it exited or did not answer in 30 s.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_bundle = _write_tls_files(directory)
    port, management_port = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{port}",
            "managementListenAddress": f"127.0.0.1:{management_port}",
            "certificate": "cert.pem",
            "privateKey": "key.pem",
            "httpPort": http01_port,
            "tlsPort": free_port(),  # TLS-ALPN-01 is unused; nothing listens there
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    (directory / "pebble-config.json").write_text(json.dumps(config, indent=2))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
        "PEBBLE_AUTHZREUSE": "0",
    }
    process = ReadyProcess(
        [PEBBLE, "-config", "pebble-config.json", "-dnsserver", dns.dns_address],
        cwd=directory,
        env=env,
        log_path=directory / "pebble.log",
        name="pebble",
    )
    server = Pebble(
        directory_url=f"https://127.0.0.1:{port}/dir",
        ca_bundle=ca_bundle,
        management_url=f"https://127.0.0.1:{management_port}",
        http01_port=http01_port,
        process=process,
    )
    process.start(ready=server.ready, timeout=30)
    return server


def start_acme_responder(
    directory: Path, database_url: str, port: int, host: str = "127.0.0.1"
) -> ReadyProcess:
    """Start ``ctrl-worker acme-responder`` (the real command) serving ``database_url``.

    Args:
        directory: its working and state directory; its log is ``acme-responder.log`` there.
        database_url: the control-plane database it reads challenges from.
        port: the port to listen on (``Pebble.http01_port`` for pebble to reach it).
        host: the address to listen on.

    Returns:
        The process, ready (an unknown token answers 404).

    Raises:
        tests.support.processes.ProcessNotReady: it exited or did not answer in 60 s.
    """
    directory.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNKEY_", "PREFECT_"))}
    env.update(
        UNKEY_STATE_DIR=str(directory),
        UNKEY_DATABASE_PRIMARY=database_url,
        UNKEY_ACME_HTTP01_HOST=host,
        UNKEY_ACME_HTTP01_PORT=str(port),
    )
    process = ReadyProcess(
        [str(Path(sys.executable).parent / "ctrl-worker"), "acme-responder"],
        cwd=directory,
        env=env,
        log_path=directory / "acme-responder.log",
        name="ctrl-worker acme-responder",
    )
    probe = f"http://{host}:{port}/.well-known/acme-challenge/readiness-probe"
    process.start(ready=lambda: httpx.get(probe, timeout=1.0).status_code == 404, timeout=60)
    return process


def _write_tls_files(directory: Path) -> Path:
    """Write ``ca.pem`` and the listener's ``cert.pem``/``key.pem``; return the CA's path."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _listener_certificate(key, ca_key, ca_cert.subject)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = directory / "key.pem"
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return ca_path


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=3650)
    )


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed CA that may sign leaf certificates only."""
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ctrl-test-pebble-ca")])
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        _validity(x509.CertificateBuilder())
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )


def _listener_certificate(
    key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name
) -> x509.Certificate:
    """The server certificate of pebble's listeners: ``localhost`` and 127.0.0.1."""
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
