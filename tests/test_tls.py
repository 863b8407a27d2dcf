"""HTTPS end to end: the sandbox serves TLS with a certificate made for the test."""

from __future__ import annotations

import pytest

from tests.helpers import run_target, singer, usage_records
from tests.platforms import m3ter_config, usage_config


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
