"""Fetch an http(s) URL for the server, bounded in time, size and destination.

``fetch_url(url, deadline_s, cap, allow_private, max_redirects)``:

* one total deadline for the whole fetch (DNS, connect, headers, body, every redirect): a watchdog shuts
  the socket down when it passes, so a server trickling a byte every few seconds cannot hold a worker;
* the host name is resolved ONCE per hop and the connection goes to the checked address (no second
  lookup a DNS-rebinding server could answer differently); unless ``allow_private`` only globally
  routable unicast addresses are used: loopback, private, link-local (cloud metadata), shared, reserved
  and multicast destinations are refused;
* no environment proxies; redirects only to http(s), at most ``max_redirects``;
* at most ``cap`` body bytes (``FetchTooLarge`` above).

Every failure to get the bytes - bad host, DNS failure, refused, blocked address, timeout, reset, an HTTP
error status - raises ``FetchFailed`` with the SAME message, so the server's answers cannot be used to
scan which hosts and ports exist behind it.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

UNREACHABLE = ("the image URL could not be fetched (unreachable, refused, not allowed, too slow, or not "
               "an image response); send the image as a data: URL instead")


class FetchFailed(Exception):
    pass


class FetchTooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def address_allowed(ip: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4 address)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def _resolve(host: str, port: int, allow_private: bool, timeout: float) -> tuple:
    """The first acceptable (family, sockaddr) for ``host``; every address is checked, not just one."""
    result: list = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError):
            result.append([])

    t = threading.Thread(target=lookup, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    infos = result[0] if result else []
    if not infos:
        raise FetchFailed()
    if not allow_private and not all(address_allowed(info[4][0]) for info in infos):
        raise FetchFailed()  # a name with any internal address is refused outright
    return infos[0][0], infos[0][4]


def _connection(scheme: str, host: str, port: int, family: int, sockaddr: tuple, timeout: float):
    def connect(_address, conn_timeout=None, source_address=None):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = connect  # connect to the address we checked, never to a new lookup
    return conn


def fetch_url(url: str, deadline_s: float, cap: int, allow_private: bool = False, max_redirects: int = 3,
              read_timeout: float | None = None) -> bytes:
    """The body of ``url`` (see the module docstring)."""
    end = time.monotonic() + deadline_s
    for _hop in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise FetchFailed() from None
        host = parts.hostname
        if scheme not in ("http", "https") or not host:
            raise FetchFailed()
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise FetchFailed()
        family, sockaddr = _resolve(host, port, allow_private, remaining)
        per_op = min(read_timeout or remaining, max(end - time.monotonic(), 0.01))
        conn = _connection(scheme, host, port, family, sockaddr, per_op)
        expired = threading.Event()
        timer = threading.Timer(max(end - time.monotonic(), 0.0), _shutdown, (conn, expired))
        timer.daemon = True
        timer.start()
        try:
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.request("GET", path, headers={"User-Agent": "gracevlm-server", "Accept": "image/*",
                                               "Connection": "close"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchFailed()
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchFailed()
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > cap:
                raise FetchTooLarge(int(length))
            chunks, total = [], 0
            while True:
                chunk = resp.read1(min(1 << 16, cap + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > cap:
                    raise FetchTooLarge(total)
                if time.monotonic() > end:
                    raise FetchFailed()
            if expired.is_set() or (length is not None and length.strip().isdigit() and total != int(length)):
                raise FetchFailed()  # cut short by the deadline (headers or body) or by the peer
            return b"".join(chunks)
        except (FetchFailed, FetchTooLarge):
            raise
        except (OSError, http.client.HTTPException, ValueError, ssl.SSLError):
            raise FetchFailed() from None
        finally:
            timer.cancel()
            conn.close()
    raise FetchFailed()  # too many redirects


def _shutdown(conn, expired: threading.Event) -> None:
    expired.set()
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
