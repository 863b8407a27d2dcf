"""HTTPS end to end: the sandbox serves TLS with a certificate made for the test."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import m3ter_config, run_target, singer, start_sandbox, stop_sandbox
from tests.test_cli_m3ter import usage_config, usage_records


@pytest.fixture
def tls_sandbox(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    sandbox = start_sandbox(tmp_path / "sandbox", "--tls-cert", str(cert), "--tls-key", str(key))
    yield sandbox, cert
    stop_sandbox(sandbox)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
def test_https_with_a_trusted_certificate(tls_sandbox, tmp_path, variable):
    sandbox, cert = tls_sandbox
    config = usage_config(sandbox)
    unset = {name: "" for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")}
    result = run_target(
        tmp_path,
        config,
        singer("usage", usage_records(1500)),
        env={**unset, variable: str(cert)},
    )
    assert result.returncode == 0, result.stderr
    import requests

    stats = requests.get(f"{sandbox.url}/_sandbox/stats", verify=str(cert), timeout=10).json()["m3ter"]
    assert stats["stored"] == 1500


def test_an_untrusted_certificate_is_one_clear_error_not_retried(tls_sandbox, tmp_path):
    sandbox, _cert = tls_sandbox
    config = m3ter_config(sandbox)
    result = run_target(tmp_path, config, singer("usage", usage_records(5)))
    assert result.returncode == 4
    assert len(result.error_lines) == 1
    assert "TLS certificate is not trusted" in result.error_lines[0]
    assert "retry" not in result.stderr
