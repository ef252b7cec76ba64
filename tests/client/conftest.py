"""Fixtures for omni_client tests: fake servers (no real Triton needed) and a closed port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from omni_client_fakes import FakeBackend, FakeServer, start_grpc, start_http


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["grpc", "http"])
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    """A fake Triton server, once per protocol."""
    backend = FakeBackend()
    if request.param == "grpc":
        url, server = start_grpc(backend)
        yield FakeServer("grpc", url, backend)
        server.stop(0)
    else:
        url, server = start_http(backend)
        yield FakeServer("http", url, backend)
        server.shutdown()
        server.server_close()
