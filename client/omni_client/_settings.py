"""Connection settings shared by the sync and asyncio clients, validated once."""

from __future__ import annotations

from typing import Any

from .urls import Protocol, check_protocol, normalize_url, uses_tls


class ClientSettings:
    """Validates and holds a client's url, protocol, default model and timeout.

    Subclasses open their tritonclient connection in :meth:`_open` (eagerly or lazily).
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol = "grpc",
        model: str = "flux",
        timeout: float | None = None,
        *,
        ssl: bool | None = None,
        verbose: bool = False,
    ) -> None:
        self.protocol: Protocol = check_protocol(protocol)
        self.url = normalize_url(url, self.protocol)
        self.model = model
        self.timeout = timeout
        self._ssl = uses_tls(url) if ssl is None else ssl
        self._verbose = verbose
        self._closed = False
        self._triton: Any = self._open()

    def _open(self) -> Any:
        """The tritonclient client, or None to create it on first use."""
        raise NotImplementedError
