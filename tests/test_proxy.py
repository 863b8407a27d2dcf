"""Proxies from the environment: plain HTTP forwarding and HTTPS through CONNECT."""

from __future__ import annotations

import http.server
import select
import socket
import socketserver
import ssl
import threading
import urllib.parse
import urllib.request

import pytest
import requests

from tests.helpers import run_target, singer, usage_records
from tests.platforms import usage_config


class ForwardProxy(http.server.ThreadingHTTPServer):
    """A small forward proxy on loopback that records what went through it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: list[str] = []
        self.auth: list[str | None] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://user:secret@127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ForwardProxy

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:  # plain HTTP: the request line holds the absolute URL
        self.server.seen.append(f"{self.command} {self.path}")
        self.server.auth.append(self.headers.get("Proxy-Authorization"))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-authorization", "host")}
        request = urllib.request.Request(self.path, data=body, method=self.command, headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy loop
        try:
            answer = opener.open(request, timeout=30)
            status, data, answer_headers = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as exc:
            status, data, answer_headers = exc.code, exc.read(), exc.headers
        self.send_response(status)
        for key, value in answer_headers.items():
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def do_CONNECT(self) -> None:  # HTTPS: a tunnel, TLS stays end to end
        self.server.seen.append(f"CONNECT {self.path}")
        self.server.auth.append(self.headers.get("Proxy-Authorization"))
        host, port = self.path.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.send_response(200, "Connection established")
        self.end_headers()
        sockets = [self.connection, upstream]
        while True:
            readable, _, _ = select.select(sockets, [], [], 30)
            if not readable:
                break
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    upstream.close()
                    self.close_connection = True
                    return
                (upstream if sock is self.connection else self.connection).sendall(data)


@pytest.fixture
def proxy():
    server = ForwardProxy()
    yield server
    server.shutdown()


def proxy_env(proxy: ForwardProxy, **extra: str) -> dict[str, str]:
    env = {
        "NO_PROXY": "",
        "no_proxy": "",
        "HTTP_PROXY": "",
        "http_proxy": "",
        "HTTPS_PROXY": "",
        "https_proxy": "",
    }
    env.update(extra)
    return env


def test_plain_http_goes_through_the_environment_proxy_with_credentials(sandbox, proxy, tmp_path):
    env = proxy_env(proxy, HTTP_PROXY=proxy.url, http_proxy=proxy.url)
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(1500)), env=env)
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 1500
    assert any(line.startswith("POST http://127.0.0.1:") and "/oauth/token" in line for line in proxy.seen)
    assert sum("/measurements" in line for line in proxy.seen) == 2
    assert set(proxy.auth) == {"Basic dXNlcjpzZWNyZXQ="}  # user:secret


def test_https_is_tunnelled_through_connect(tls_sandbox, proxy, tmp_path):
    sandbox, cert = tls_sandbox
    env = proxy_env(
        proxy,
        HTTPS_PROXY=proxy.url,
        https_proxy=proxy.url,
        REQUESTS_CA_BUNDLE=str(cert),
        SSL_CERT_FILE=str(cert),
    )
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(1500)), env=env)
    assert result.returncode == 0, result.stderr
    assert proxy.seen and all(line.startswith("CONNECT 127.0.0.1:") for line in proxy.seen)
    assert set(proxy.auth) == {"Basic dXNlcjpzZWNyZXQ="}
    stats = requests.get(f"{sandbox.url}/_sandbox/stats", verify=str(cert), timeout=10).json()["m3ter"]
    assert stats["stored"] == 1500


def test_no_proxy_bypasses_the_proxy(sandbox, proxy, tmp_path):
    env = proxy_env(
        proxy, HTTP_PROXY=proxy.url, http_proxy=proxy.url, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1"
    )
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(10)), env=env)
    assert result.returncode == 0, result.stderr
    assert proxy.seen == []
    assert sandbox.stats("m3ter")["stored"] == 10


def test_all_proxy_is_used_when_no_scheme_proxy_is_set(sandbox, proxy, tmp_path):
    env = proxy_env(proxy, ALL_PROXY=proxy.url, all_proxy=proxy.url)
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(10)), env=env)
    assert result.returncode == 0, result.stderr
    assert any("/measurements" in line for line in proxy.seen)
    assert sandbox.stats("m3ter")["stored"] == 10


def test_a_cidr_range_in_no_proxy_bypasses_the_proxy(sandbox, proxy, tmp_path):
    env = proxy_env(
        proxy, HTTP_PROXY=proxy.url, http_proxy=proxy.url, NO_PROXY="10.0.0.0/8,127.0.0.0/8", no_proxy=""
    )
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(10)), env=env)
    assert result.returncode == 0, result.stderr
    assert proxy.seen == []
    assert sandbox.stats("m3ter")["stored"] == 10


def test_an_https_proxy_is_reached_over_tls(tls_sandbox, sandbox, tmp_path):
    _tls, cert = tls_sandbox  # only its certificate: the proxy presents it
    key = cert.with_name("key.pem")
    server = ForwardProxy()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    try:
        url = f"https://user:secret@127.0.0.1:{server.server_address[1]}"
        env = proxy_env(server, HTTP_PROXY=url, http_proxy=url, REQUESTS_CA_BUNDLE=str(cert))
        result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(10)), env=env)
        assert result.returncode == 0, result.stderr
        assert any("/measurements" in line for line in server.seen)
        assert set(server.auth) == {"Basic dXNlcjpzZWNyZXQ="}
        assert sandbox.stats("m3ter")["stored"] == 10
    finally:
        server.shutdown()


def test_a_netrc_entry_for_the_api_host_does_not_replace_our_credentials(sandbox, tmp_path):
    # requests would put ~/.netrc credentials in place of the Authorization header
    # (psf/requests#3929) if it read the environment per request
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login intruder password wrong\n")
    (home / ".netrc").chmod(0o600)
    config = usage_config(sandbox)
    result = run_target(tmp_path, config, singer("usage", usage_records(10)), env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 10


class Socks5Proxy(socketserver.ThreadingTCPServer):
    """A small SOCKS5 proxy (RFC 1928, user/password RFC 1929) on loopback."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Socks5Handler)
        self.connects: list[str] = []
        self.users: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"socks5h://user:secret@127.0.0.1:{self.server_address[1]}"


class _Socks5Handler(socketserver.BaseRequestHandler):
    server: Socks5Proxy

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.request.recv(count - len(data))
            if not chunk:
                raise ConnectionError("client went away")
            data += chunk
        return data

    def handle(self) -> None:
        _version, methods = self._read(2)
        offered = self._read(methods)
        if 2 in offered:  # user/password
            self.request.sendall(b"\x05\x02")
            _sub, length = self._read(2)
            user = self._read(length).decode()
            (length,) = self._read(1)
            self._read(length)  # password
            self.server.users.append(user)
            self.request.sendall(b"\x01\x00")
        else:
            self.request.sendall(b"\x05\x00")
        _version, _command, _reserved, kind = self._read(4)
        if kind == 1:
            host = socket.inet_ntoa(self._read(4))
        elif kind == 3:
            (length,) = self._read(1)
            host = self._read(length).decode()
        else:
            host = socket.inet_ntop(socket.AF_INET6, self._read(16))
        port = int.from_bytes(self._read(2), "big")
        self.server.connects.append(f"{host}:{port}")
        upstream = socket.create_connection((host, port))
        self.request.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + (0).to_bytes(2, "big"))
        sockets = [self.request, upstream]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 30)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is self.request else self.request).sendall(data)
        finally:
            upstream.close()


def test_a_socks5h_proxy_from_all_proxy(sandbox, tmp_path):
    server = Socks5Proxy()
    try:
        env = proxy_env(server, ALL_PROXY=server.url, all_proxy=server.url)
        result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(10)), env=env)
        assert result.returncode == 0, result.stderr
        port = sandbox.url.rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}" in server.connects  # the proxy resolved and connected
        assert set(server.users) == {"user"}
        assert sandbox.stats("m3ter")["stored"] == 10
    finally:
        server.shutdown()
