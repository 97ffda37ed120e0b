"""TLS and mutual TLS with certificates made by the test (openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from serving.server import ServerConfigError, create_server
from tests.test_serving import (
    READER_KEY,
    Running,
    score_doc,
    serving_settings,
    start,
    status_of,
    write_score,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(name: str, subject: str, cwd: Path, ext: str | None = None) -> None:
    """A key and a certificate for ``name`` signed by ca.pem."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-subj", f"/CN={subject}", "-out", f"{name}.csr", cwd=cwd)
    extra = []
    if ext:
        (cwd / f"{name}.ext").write_text(ext)
        extra = ["-extfile", f"{name}.ext"]
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-out", f"{name}.pem", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-subj", "/CN=crmscore test CA", "-days", "2", "-out", "ca.pem", cwd=d)
    issue("server", "localhost", d, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    issue("client", "crm-client", d, "extendedKeyUsage=clientAuth\n")
    return d


def tls_server(redis_url: str, certs: Path, mtls: bool) -> Running:
    return start(serving_settings(
        redis_url, f"tls-{uuid.uuid4().hex[:6]}:", tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem") if mtls else "",
    ))


@pytest.fixture
def seeded(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def test_tls_serves_clients_that_trust_the_ca(redis_url, certs, seeded) -> None:
    api = tls_server(redis_url, certs, mtls=False)
    try:
        write_score(seeded, api.layout, score_doc("t-1"))
        ca = (certs / "ca.pem").read_bytes()
        with api.client(READER_KEY, root_certificates=ca) as client:
            assert client.get_score("t-1").customer_id == "t-1"
        with api.client(READER_KEY) as plaintext:  # no TLS: the handshake fails
            code, _ = status_of(plaintext.get_score, "t-1", timeout=2)
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        api.server.stop(0)


def test_mtls_requires_a_client_certificate(redis_url, certs, seeded) -> None:
    api = tls_server(redis_url, certs, mtls=True)
    try:
        write_score(seeded, api.layout, score_doc("t-2"))
        ca = (certs / "ca.pem").read_bytes()
        with api.client(READER_KEY, root_certificates=ca) as anonymous:
            code, _ = status_of(anonymous.get_score, "t-2", timeout=2)
            assert code == grpc.StatusCode.UNAVAILABLE
        with api.client(
            READER_KEY, root_certificates=ca,
            private_key=(certs / "client.key").read_bytes(),
            certificate_chain=(certs / "client.pem").read_bytes(),
        ) as client:
            assert client.get_score("t-2").customer_id == "t-2"
    finally:
        api.server.stop(0)


def test_half_configured_tls_refuses_to_start(redis_url, certs) -> None:
    settings = serving_settings(redis_url, "tls-bad:", tls_cert=str(certs / "server.pem"))
    with pytest.raises(ServerConfigError, match="both CRMSCORE_TLS_CERT and CRMSCORE_TLS_KEY"):
        create_server(settings)
    missing = serving_settings(redis_url, "tls-bad:", tls_cert=str(certs / "nope.pem"),
                               tls_key=str(certs / "server.key"))
    with pytest.raises(ServerConfigError, match="cannot read the TLS certificate"):
        create_server(missing)
