"""``image_url`` handling for the server: turn a URL into a decoded RGB image, under a policy.

* ``data:image/<type>;base64,<data>``: always accepted (bounded by the request body cap and
  ``max_image_bytes``).
* ``file://`` URLs: only when ``allowed_local_path`` is set, and only for regular files inside that
  folder, opened relative to it without a check-then-open race (``beneath.py``: ``openat2`` with
  ``RESOLVE_BENEATH``, else component-wise ``O_NOFOLLOW``).
* ``http://`` / ``https://``: only with ``allow_remote`` (``fetch.py``): one total deadline of
  ``fetch_timeout`` seconds, at most ``max_image_bytes`` bytes and ``max_redirects`` http(s) redirects, no
  environment proxies; private, loopback and link-local destinations are refused unless
  ``allow_private_hosts``; every unreachable URL gets the same message.
* ``max_image_side``: the longer side cap (read from the header before decoding): LLaVA pads an image to
  a square of its longer side, so that side, not the pixel count alone, bounds the memory.

Every refusal raises ``MediaError`` with the HTTP status the server answers: 400 (bad or disabled URL,
fetch failure), 413 (too many bytes or pixels), 422 (bytes that are not a decodable image).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path


from ..errors import InputError
from ..engine.images import ImageTooLarge, RGBImage, decode_image as decode_rgb
from .beneath import BeneathError, read_file_beneath
from .fetch import UNREACHABLE, FetchFailed, FetchTooLarge, fetch_url

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGE_SIDE = 8000  # the padded square: 8000^2 RGB = 183 MiB at most (= the engine's 64 Mpx)


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
    allow_private_hosts: bool = False
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE


_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)((?:;[^;,]*)*?);base64,", re.ASCII)


def load_image_url(url: str, policy: MediaPolicy) -> RGBImage:
    """Fetch (under ``policy``) and decode one image."""
    return decode_image(fetch_bytes(url, policy), policy.max_image_pixels, policy.max_image_side)


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
    if "\0" in path:
        raise MediaError(400, "invalid_image_url", "the file URL contains a NUL byte (%00)")
    relative = _relative_to_root(path, policy.allowed_local_path)
    try:
        return read_file_beneath(os.path.realpath(policy.allowed_local_path), relative, policy.max_image_bytes)
    except BeneathError as exc:
        if exc.reason == "too_large":
            raise _too_big("the image file", exc.size, policy.max_image_bytes) from None
        raise MediaError(400, *_LOCAL_ERRORS[exc.reason]) from None


_OUTSIDE = ("local_file_not_allowed", "the file is outside the folder this server allows images from "
            "(--allowed-local-media-path), or reached through a symlink that leaves it")
_LOCAL_ERRORS = {
    "outside": _OUTSIDE,
    "missing": ("image_not_found", "no such image file under the allowed media folder"),
    "unreadable": ("image_not_readable", "the image file exists but the server may not read it "
                   "(permission denied)"),
    "not_a_file": ("image_not_found", "the path under the allowed media folder is not a regular file"),
}


def _relative_to_root(path: str, root: Path) -> str:
    """``path`` (absolute, as the client wrote it) relative to the allowed folder, named as configured
    or by its real path; ``..`` is collapsed first and the open is confined anyway (``beneath.py``)."""
    if not os.path.isabs(path):
        raise MediaError(400, "local_file_not_allowed", _OUTSIDE[1])
    norm = os.path.normpath(path)
    for prefix in dict.fromkeys((os.path.normpath(os.path.abspath(root)), os.path.realpath(root))):
        if norm.startswith(prefix.rstrip(os.sep) + os.sep):
            return norm[len(prefix.rstrip(os.sep)) + 1:]
    raise MediaError(400, "local_file_not_allowed", _OUTSIDE[1])


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise MediaError(400, "remote_images_disabled", "http(s) image URLs are disabled on this server (start "
                         "it with --allow-remote-images to fetch them), send the image as a data URL instead")
    try:
        return fetch_url(url, policy.fetch_timeout, policy.max_image_bytes, policy.allow_private_hosts,
                         policy.max_redirects)
    except FetchTooLarge as exc:
        raise _too_big("the remote image", exc.size, policy.max_image_bytes) from None
    except FetchFailed:
        raise MediaError(400, "image_fetch_failed", UNREACHABLE) from None


def decode_image(data: bytes, max_pixels: int, max_side: int | None = None) -> RGBImage:
    """Bytes -> an image decoded once (the engine uses it as it is); 413 when the header announces more than
    ``max_pixels`` pixels or a longer side over ``max_side``, 422 when undecodable."""
    try:
        return decode_rgb(data, max_pixels, max_side)
    except ImageTooLarge as exc:
        if not exc.width:
            raise MediaError(413, "image_too_large", "the image has too many pixels") from None
        if max_side is not None and max(exc.width, exc.height) > max_side:
            raise MediaError(413, "image_too_large", f"the image is {exc.width}x{exc.height}; its longer side is over "
                             f"the server's limit of {max_side} pixels (--max-image-side; it is padded to a "
                             "square)") from None
        raise MediaError(413, "image_too_large", f"the image has {exc.width}x{exc.height} = "
                         f"{exc.width * exc.height} pixels, more than the server's limit of {max_pixels}") from None
    except InputError:
        raise MediaError(422, "invalid_image", "the image could not be decoded (not a supported image format, "
                         "truncated, or corrupt pixel data)") from None