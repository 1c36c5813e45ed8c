"""``image_url`` handling for the server: turn a URL into a decoded RGB image, under a policy.

* ``data:image/<type>;base64,<data>``: always accepted (bounded by the request body cap and
  ``max_image_bytes``).
* ``file://`` URLs: only when ``allowed_local_path`` is set, and only for files whose real path (symlinks
  resolved) lies inside that folder.
* ``http://`` / ``https://``: only with ``allow_remote``; direct connection (environment proxies are not
  used), ``fetch_timeout`` seconds per connect/read, at most ``max_image_bytes`` bytes, at most
  ``max_redirects`` redirects and only to http(s). Any host is allowed, private and loopback addresses
  included: enable it only where the server may reach what the client names.

Every refusal raises ``MediaError`` with the HTTP status the server answers: 400 (bad or disabled URL,
fetch failure), 413 (too many bytes or pixels), 422 (bytes that are not a decodable image).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path


from ..errors import InputError
from ..engine.images import ImageTooLarge, RGBImage, decode_image as decode_rgb

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class MediaError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None
    allow_remote: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout: float = 10.0
    max_redirects: int = 3


_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)((?:;[^;,]*)*?);base64,", re.ASCII)


def load_image_url(url: str, policy: MediaPolicy) -> RGBImage:
    """Fetch (under ``policy``) and decode one image."""
    return decode_image(fetch_bytes(url, policy), policy.max_image_pixels)


def fetch_bytes(url: str, policy: MediaPolicy) -> bytes:
    if not isinstance(url, str) or not url:
        raise MediaError(400, "invalid_image_url", "image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy)
    if scheme == "file":
        return _local_file(url, policy)
    if scheme in ("http", "https"):
        return _remote(url, policy)
    raise MediaError(400, "invalid_image_url", f"image URL scheme {scheme or '(none)'!r} is not supported; use "
                     "a data:image/...;base64, URL (or file:// / http(s):// where the server enables them)")


def _too_big(what: str, size: int, cap: int) -> MediaError:
    return MediaError(413, "image_too_large", f"{what} has {size} bytes, more than the server's limit of {cap}")


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    m = _DATA_URL.match(url)
    if m is None:
        raise MediaError(400, "invalid_image_url", "a data URL must look like data:image/<type>;base64,<data>")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > policy.max_image_bytes + 3:
        raise _too_big("the data URL image", len(payload) * 3 // 4, policy.max_image_bytes)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(400, "invalid_image_url", f"the data URL is not valid base64 ({exc})") from None
    if len(data) > policy.max_image_bytes:
        raise _too_big("the data URL image", len(data), policy.max_image_bytes)
    return data


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError(400, "local_files_disabled", "file:// image URLs are disabled on this server "
                         "(start it with --allowed-local-media-path DIR to allow files under DIR)")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(400, "invalid_image_url", f"file URL host {parts.netloc!r} is not supported; use "
                         "file:///absolute/path")
    path = urllib.request.url2pathname(urllib.parse.unquote(parts.path))
    root = os.path.realpath(policy.allowed_local_path)
    real = os.path.realpath(path)
    if not os.path.isabs(path) or os.path.commonpath([root, real]) != root:
        raise MediaError(400, "local_file_not_allowed", "the file is outside the folder this server allows "
                         "images from (--allowed-local-media-path)")
    if not os.path.isfile(real):
        raise MediaError(400, "image_not_found", "no such image file under the allowed media folder")
    size = os.path.getsize(real)
    if size > policy.max_image_bytes:
        raise _too_big("the image file", size, policy.max_image_bytes)
    with open(real, "rb") as fh:
        data = fh.read(policy.max_image_bytes + 1)
    if len(data) > policy.max_image_bytes:
        raise _too_big("the image file", len(data), policy.max_image_bytes)
    return data


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, max_redirects: int):
        super().__init__()
        self.max_redirections = max_redirects
        self.max_repeats = max_redirects

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(400, "image_fetch_failed", f"the image URL redirects to a {scheme!r} URL; only "
                             "http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise MediaError(400, "remote_images_disabled", "http(s) image URLs are disabled on this server (start "
                         "it with --allow-remote-images to fetch them), send the image as a data URL instead")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Redirects(policy.max_redirects))
    req = urllib.request.Request(url, headers={"User-Agent": "gracevlm-server", "Accept": "image/*"})
    cap = policy.max_image_bytes
    try:
        with opener.open(req, timeout=policy.fetch_timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise _too_big("the remote image", int(length), cap)
            chunks, total = [], 0
            while True:
                chunk = resp.read(min(1 << 16, cap + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > cap:
                    raise _too_big("the remote image", total, cap)
            return b"".join(chunks)
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        raise MediaError(400, "image_fetch_failed", f"fetching the image URL failed: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaError(400, "image_fetch_failed", f"fetching the image URL failed: {reason}") from None


def decode_image(data: bytes, max_pixels: int) -> RGBImage:
    """Bytes -> an image decoded once (the engine uses it as it is); 413 when the header announces more than
    ``max_pixels``, 422 when undecodable."""
    try:
        return decode_rgb(data, max_pixels)
    except ImageTooLarge as exc:
        if not exc.width:
            raise MediaError(413, "image_too_large", "the image has too many pixels") from None
        raise MediaError(413, "image_too_large", f"the image has {exc.width}x{exc.height} = "
                         f"{exc.width * exc.height} pixels, more than the server's limit of {max_pixels}") from None
    except InputError:
        raise MediaError(422, "invalid_image", "the image could not be decoded (not a supported image format, "
                         "truncated, or corrupt pixel data)") from None