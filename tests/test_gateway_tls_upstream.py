"""The gateway calls an https upstream and checks its certificate (a real gateway process, a real TLS server).

The upstream's certificate comes from a throw-away CA made here; the gateway
trusts it only through ``SSL_CERT_FILE`` (the standard OpenSSL variable its
default TLS context honours). Trusted: the request goes through, TLS on the
wire. Not trusted: the gateway answers 502 and the app behind is never called.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from edge_mesh import EdgeGateway, running, write_gateway


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, hashes.SHA256())


class _Upstream(BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = json.dumps({"tls": True, "caller_token": self.headers.get("Authorization", "")[:7]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[int, Path, list[str]]]:
    """An https server on 127.0.0.1 with a certificate from a CA written to ``ca.pem``."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("meshauth test CA", ca_key, None, ca_key)
    server = _certificate("127.0.0.1", server_key, ca, ca_key)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = tmp_path / "upstream.pem"
    chain.write_bytes(
        server.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    seen: list[str] = []
    handler = type("Upstream", (_Upstream,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], ca_file, seen
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _gateway(tmp_path: Path, port: int) -> EdgeGateway:
    gateway = write_gateway(tmp_path, port)
    text = gateway.config.read_text()
    gateway.config.write_text(
        text.replace(f'upstream = "http://127.0.0.1:{port}"', f'upstream = "https://127.0.0.1:{port}"')
    )
    assert "https://127.0.0.1" in gateway.config.read_text()
    return gateway


def _get(gateway: EdgeGateway) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        token = gateway.user_token()
        sock.sendall(f"GET /orders/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_a_trusted_https_upstream_is_called_over_tls(tmp_path: Path, tls_upstream: tuple[int, Path, list[str]]) -> None:
    port, ca_file, seen = tls_upstream
    gateway = _gateway(tmp_path, port)
    gateway.env["SSL_CERT_FILE"] = str(ca_file)
    with running(gateway):
        status, body = _get(gateway)
        again, _ = _get(gateway)  # a pooled TLS connection is reused
    assert status == 200 and again == 200, gateway.log()
    assert json.loads(body) == {"tls": True, "caller_token": "Bearer "}
    assert seen == ["/orders/1", "/orders/1"]


def test_an_upstream_certificate_the_gateway_does_not_trust_is_502(
    tmp_path: Path, tls_upstream: tuple[int, Path, list[str]]
) -> None:
    port, _ca_file, seen = tls_upstream
    gateway = _gateway(tmp_path, port)
    gateway.env["SSL_CERT_FILE"] = str(tmp_path / "idp-jwks.json")  # not a CA: nothing is trusted
    with running(gateway):
        status, _ = _get(gateway)
        records = gateway.records_after(0)
    assert status == 502
    assert seen == []  # the handshake failed: no request reached the app
    record = records[-1]
    assert (record["outcome"], record["reason"], record["status"]) == ("error", "upstream_unreachable", 502)
    assert record["detail"] == "upstream call failed: UpstreamCertificateRejected"  # says what to fix
