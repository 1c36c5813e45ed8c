"""Checks the gate (``app.Gate``) applies to every HTTP request before routing it.

* Host (DNS rebinding): when ``allowed_hosts`` is not ``("*",)`` the ``Host`` header, port removed, must be
  one of them. The CLI sets loopback names when the server binds a loopback address, so a web page on an
  attacker's domain that resolves to 127.0.0.1 is refused.
* Origin (cross-site requests from browsers): a request carrying an ``Origin`` header is refused unless
  that origin is the server's own (its host:port equals the ``Host`` header) or listed in
  ``allowed_origins`` (``*``: any). Listed origins get CORS headers, and their preflight (``OPTIONS``)
  is answered.
* Content type: a ``POST`` to ``/v1/*`` must say ``application/json``; ``text/plain`` and form types are
  what a page can send cross-site without a preflight.

Each refusal is an ``APIError``: 403 (host, origin) or 415 (content type).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from .serving import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-Request-ID"


def _strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_host(headers: dict[bytes, bytes], allowed: tuple[str, ...]) -> None:
    if "*" in allowed:
        return
    host = _strip_port(headers.get(b"host", b"").decode("latin-1"))
    if host not in {h.lower() for h in allowed} and not host.startswith("127."):
        raise APIError(403, f"the Host header {host!r} is not one this server answers to (--allowed-hosts)",
                       "host_not_allowed")


def cross_origin(headers: dict[bytes, bytes], allowed: tuple[str, ...]) -> str | None:
    """The request's ``Origin`` when it is a listed foreign origin (CORS headers go back), None for a
    same-origin or non-browser request; ``APIError(403)`` for an unlisted foreign origin."""
    origin = headers.get(b"origin")
    if origin is None:
        return None
    origin_s = origin.decode("latin-1").strip()
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    netloc = urlsplit(origin_s).netloc.lower() if origin_s != "null" else ""
    if netloc and netloc == host:
        return None
    if "*" in allowed or origin_s.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return origin_s
    raise APIError(403, f"cross-origin requests from {origin_s!r} are not allowed; start the server with "
                   "--allowed-origins to allow a web page on another origin", "origin_not_allowed")


def check_json_body(method: str, path: str, headers: dict[bytes, bytes]) -> None:
    if method != "POST" or not path.startswith("/v1/"):
        return
    kind = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the request body must be sent as Content-Type: application/json (got "
                       f"{kind or 'none'!r})", "unsupported_media_type")


def cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


def preflight_headers() -> dict[str, str]:
    """Added to ``cors_headers`` in the answer to a listed origin's preflight."""
    return {"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Allow-Headers": CORS_HEADERS,
            "Access-Control-Max-Age": "600"}
