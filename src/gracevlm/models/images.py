"""Image decoding shared by every model family: any source (path, bytes, file object, PIL image) -> one RGB
``PIL.Image.Image``, with the pixel count checked against ``max_pixels`` before any pixel is decoded.

RGB conversion follows ``PIL.Image.convert("RGB")`` (what LLaVA's and transformers' loaders do): alpha is
dropped, not composited; P-with-transparency uses the palette colours. Two deliberate departures, both for
modes where ``convert`` throws information away: 16-bit greyscale (``I;16*`` and ``I``) is scaled from
0..65535 to 0..255 (``round(v / 257)``) instead of clipped at 255, and ``F`` is clipped to 0..255 and truncated
(NaN becomes 0). EXIF orientation is *not* applied (LLaVA does not apply it). Animated images give their first
frame. ``decode_image`` wraps the result as ``RGBImage`` so that a request's image is decoded exactly once:
every ``preprocess`` takes an ``RGBImage`` as it is.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

import numpy as np
from PIL import Image

from ..errors import InputError

DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO, Image.Image]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS", "I")


class ImageTooLarge(InputError):
    """An image over the pixel cap (from its header, before decoding) or refused as a decompression bomb;
    ``width``/``height`` are 0 when PIL refused it before the size was known."""

    def __init__(self, message: str, width: int = 0, height: int = 0, max_pixels: int = 0):
        super().__init__(message)
        self.width, self.height, self.max_pixels = width, height, max_pixels


@dataclass(frozen=True)
class RGBImage:
    """An image already decoded to RGB (by ``decode_image``); ``image`` is not shared with the caller."""

    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_image(source: "ImageSource | RGBImage", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int | None = None) -> RGBImage:
    """Decode ``source`` once (``load_image``); an ``RGBImage`` is returned as is after the size checks.
    ``max_side`` also bounds the longer side (checked from the header, like the pixel count)."""
    if isinstance(source, RGBImage):
        check_pixels(source.image, max_pixels, "image", max_side)
        return source
    return RGBImage(load_image(source, max_pixels, max_side))


def check_pixels(img: Image.Image, max_pixels: int, name: str, max_side: int | None = None) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InputError(f"{name} has size {width}x{height}; an image needs at least one pixel")
    if max_side is not None and max(width, height) > max_side:
        raise ImageTooLarge(f"{name} is {width}x{height}; its longer side is over the cap of {max_side} pixels "
                            "(max_side); downscale the image", width, height, max_pixels)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the cap of {max_pixels:,} "
            "pixels (max_pixels, a decompression-bomb guard); downscale the image or raise max_pixels "
            "(ImageSpec.max_pixels) if it is trusted", width, height, max_pixels)


def check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{what} must be a positive integer, got {value!r}")


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Decode ``source`` into a new RGB ``PIL.Image.Image`` (first frame, no EXIF rotation).

    ``source``: a path (``str`` / ``os.PathLike``), encoded bytes (``bytes``, ``bytearray``,
    ``memoryview``), a binary file object, or a ``PIL.Image.Image`` (not modified; a converted
    copy is returned). Raises ``InputError`` when the file is missing, empty or not a decodable
    image, when its mode cannot be made RGB, or when it has more than ``max_pixels`` pixels (checked
    from the header, before decoding; PIL's own decompression-bomb limit also raises).
    """
    check_positive_int(max_pixels, "max_pixels")

    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels, max_side=max_side)

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        name = repr(path)
        if path.startswith(("http://", "https://")):
            raise InputError(
                f"image source {name} is a URL; gracevlm does not download images - fetch the file "
                "first and pass its path or its bytes"
            )
        if not os.path.exists(path):
            raise InputError(f"image file {name} does not exist; check the path (cwd: {os.getcwd()!r})")
        if os.path.isdir(path):
            raise InputError(f"image path {name} is a directory; pass the path of an image file")
        if os.path.getsize(path) == 0:
            raise InputError(f"image file {name} is empty (0 bytes), not a decodable image; re-download or re-export it")
        try:
            fp: Any = open(path, "rb")
        except OSError as exc:
            raise InputError(f"image file {name} cannot be opened ({exc}); check its permissions") from exc
        with fp:
            return _decode(fp, f"image file {name}", max_pixels, max_side)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<bytes, {len(data)} bytes>"
        if not data:
            raise InputError(f"image {name} is empty, not a decodable image; pass the encoded file contents")
        return _decode(io.BytesIO(data), f"image {name}", max_pixels, max_side)

    if hasattr(source, "read"):
        label = getattr(source, "name", None)
        name = f"image file object {label!r}" if isinstance(label, (str, bytes)) else "image <file object>"
        if isinstance(source, io.TextIOBase):
            raise InputError(f"{name} is opened in text mode; open it in binary mode ('rb')")
        return _decode(source, name, max_pixels, max_side)

    raise InputError(
        f"image source of type {type(source).__name__} is not supported; pass a path, bytes, a binary "
        "file object or a PIL.Image.Image (for an array use PIL.Image.fromarray first)"
    )


def _decode(fp: Any, name: str, max_pixels: int, max_side: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"{name} is refused as a possible decompression bomb: {exc} Raise "
            "PIL.Image.MAX_IMAGE_PIXELS (and max_pixels) only for trusted images."
        ) from exc
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error, ...)
        raise InputError(
            f"{name} is not a decodable image ({type(exc).__name__}: {exc}); check that it is a complete "
            "image file in a format PIL reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)"
        ) from exc
    with img:
        return _from_pil(img, max_pixels, name=name, max_side=max_side)


def _from_pil(img: Image.Image, max_pixels: int, name: str = "PIL image", max_side: int | None = None) -> Image.Image:
    check_pixels(img, max_pixels, name, max_side)
    frame = img.tell() if getattr(img, "n_frames", 1) > 1 else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if frame:
                img.seek(0)
            try:
                img.load()
                rgb = _to_rgb(img, name)
            finally:
                if frame:
                    img.seek(frame)  # leave a caller's animated image on the frame it was on
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name} is refused as a possible decompression bomb: {exc}") from exc
    except Exception as exc:
        raise InputError(
            f"{name} is not a decodable image ({type(exc).__name__}: {exc}); the file is probably "
            "truncated or corrupt - re-download or re-export it"
        ) from exc
    return rgb


def _to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """RGB copy of ``img`` with ``convert("RGB")`` semantics, except 16-bit grey is scaled, not clipped."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        # convert() clips 16-bit / 32-bit integer grey at 255 (a 16-bit PNG turns almost white);
        # map 0..65535 linearly onto 0..255 instead: round(v / 257) (257 = 65535 / 255, odd, no ties).
        values = np.asarray(img).astype(np.int64)
        grey = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        # Same as convert(): clip to 0..255 and truncate; NaN -> 0.
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.floor(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA":
            # dropping the transparency is exactly what LLaVA's convert("RGB") does.
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            return img.convert("RGB")
    except ValueError as exc:
        raise InputError(
            f"{name} has mode {mode!r}, which PIL cannot convert to RGB ({exc}); convert it to RGB "
            "yourself (e.g. with PIL.ImageCms for LAB)"
        ) from exc
