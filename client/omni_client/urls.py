"""Server URL normalisation."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from .errors import InvalidRequestError

Protocol = Literal["grpc", "http"]

DEFAULT_PORTS: dict[str, int] = {"http": 8000, "grpc": 8001}
_SCHEMES = ("http", "https", "grpc", "grpcs")


def check_protocol(protocol: str) -> Protocol:
    """Validates a protocol name.

    Args:
        protocol: ``"grpc"`` or ``"http"`` (case-insensitive).

    Returns:
        The lower-cased protocol name.

    Raises:
        InvalidRequestError: If the protocol is not supported.
    """
    proto = str(protocol).lower()
    if proto not in DEFAULT_PORTS:
        raise InvalidRequestError(f"unsupported protocol {protocol!r}; expected 'grpc' or 'http'")
    return proto  # type: ignore[return-value]


def normalize_url(url: str | None, protocol: str = "grpc") -> str:
    """Turns a user-supplied server address into the ``host:port[/path]`` form tritonclient expects.

    Accepts ``host``, ``host:port``, ``[::1]:port`` and the same with an ``http://``, ``https://``
    or ``grpc://`` prefix. A missing host means ``localhost``; a missing port means the protocol's
    default (8000 for HTTP, 8001 for gRPC). A base path is kept for HTTP (reverse proxies) and
    rejected for gRPC.

    Args:
        url: The address, or None for ``localhost`` with the default port.
        protocol: ``"grpc"`` or ``"http"``.

    Returns:
        The normalised address, e.g. ``"localhost:8001"``.

    Raises:
        InvalidRequestError: If the address cannot be parsed.
    """
    proto = check_protocol(protocol)
    raw = (url or "").strip()
    rest = raw
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise InvalidRequestError(f"invalid url {url!r}: unsupported scheme {scheme!r}")
    if any(c.isspace() for c in rest) or "?" in rest or "#" in rest or "@" in rest:
        raise InvalidRequestError(f"invalid url {url!r}")
    try:
        parts = urlsplit("//" + rest)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise InvalidRequestError(f"invalid url {url!r}: {exc}") from None
    if parts.netloc.endswith(":"):
        raise InvalidRequestError(f"invalid url {url!r}: empty port")
    if port == 0:
        raise InvalidRequestError(f"invalid url {url!r}: port must be in 1..65535")
    host = host or "localhost"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    path = parts.path.rstrip("/")
    if path and proto == "grpc":
        raise InvalidRequestError(f"invalid url {url!r}: gRPC addresses cannot have a path")
    return f"{host}:{port or DEFAULT_PORTS[proto]}{path}"


def uses_tls(url: str | None) -> bool:
    """Tells whether an address asks for TLS through its scheme (``https://`` or ``grpcs://``).

    Args:
        url: The address as given by the user.

    Returns:
        True for ``https://`` and ``grpcs://`` addresses.
    """
    scheme = (url or "").strip().split("://", 1)[0].lower() if "://" in (url or "") else ""
    return scheme in ("https", "grpcs")
