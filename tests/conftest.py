"""Fixtures: the real sandbox, as a subprocess on loopback (helpers: tests/helpers.py,
tests/platforms.py, tests/referees.py)."""

from __future__ import annotations

import typing as t

import pytest

from tests.helpers import Sandbox, self_signed_cert, start_sandbox, stop_sandbox


@pytest.fixture(scope="session")
def sandbox_session(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield sandbox
    stop_sandbox(sandbox)


@pytest.fixture
def sandbox(sandbox_session: Sandbox) -> Sandbox:
    """The shared sandbox, emptied (items, stats, faults, tokens) for each test."""
    sandbox_session.reset()
    return sandbox_session


@pytest.fixture
def tls_sandbox(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    sandbox = start_sandbox(tmp_path / "sandbox", "--tls-cert", str(cert), "--tls-key", str(key))
    yield sandbox, cert
    stop_sandbox(sandbox)
