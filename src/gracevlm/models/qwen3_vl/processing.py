"""Qwen3-VL image processing: RGB, ``smart_resize``, PIL bicubic, rescale + normalize, patchify.

Bit-identical to transformers' ``Qwen2VLImageProcessor`` PIL backend: the resize runs on the uint8 RGB
image, ``x * rescale_factor`` in float64 then float32, ``(x - mean) / std`` in float32, and patches are
emitted in merge-block order ``(bh, bw, ih, iw)``, each flattened as ``(C, T, P, P)`` with the still
frame repeated ``T`` times. Settings come from the checkpoint's ``preprocessor_config.json`` (or the
image-processor dict nested in ``processor_config.json``).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ...errors import CheckpointError, InputError
from ...formats.checkpoint import read_json_object

MAX_ASPECT = 200


@dataclass
class ImageProcessorConfig:
    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ImageProcessorConfig":
        def fail(key, problem):
            return CheckpointError(f"{source}: {key} {problem}")

        size = d.get("size") or {}
        if not isinstance(size, dict):
            raise fail("size", f"must be an object, got {size!r}")
        lo = size.get("shortest_edge", d.get("min_pixels"))
        hi = size.get("longest_edge", d.get("max_pixels"))
        for key, v in (("size.shortest_edge (min pixels)", lo), ("size.longest_edge (max pixels)", hi)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise fail(key, f"must be a positive integer, got {v!r}")
        if lo > hi:
            raise fail("size", f"min pixels {lo} exceed max pixels {hi}")
        ints = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise fail(key, f"must be a positive integer, got {v!r}")
            ints[key] = v
        stats = {}
        for key in ("image_mean", "image_std"):
            v = d.get(key)
            if not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
                raise fail(key, f"must be three numbers, got {v!r}")
            if key == "image_std" and any(x == 0 for x in v):
                raise fail(key, "must not contain 0")
            stats[key] = tuple(float(x) for x in v)
        if d.get("do_resize", True) is not True or d.get("do_rescale", True) is not True \
                or d.get("do_normalize", True) is not True:
            raise fail("do_resize/do_rescale/do_normalize", "must all be true (the model was trained that way)")
        resample = d.get("resample", int(Image.Resampling.BICUBIC))
        if resample not in {int(r) for r in Image.Resampling}:
            raise fail("resample", f"{resample!r} is not a PIL resampling filter")
        factor = float(d.get("rescale_factor", 1 / 255))
        return cls(min_pixels=lo, max_pixels=hi, rescale_factor=factor, resample=int(resample), **ints, **stats)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageProcessorConfig":
        """From ``preprocessor_config.json``, else ``processor_config.json``'s ``image_processor`` dict."""
        folder = Path(folder)
        pre, proc = folder / "preprocessor_config.json", folder / "processor_config.json"
        if pre.is_file():
            return cls.from_dict(read_json_object(pre), str(pre))
        if proc.is_file():
            d = read_json_object(proc)
            if not isinstance(d.get("image_processor"), dict):
                raise CheckpointError(f"{proc}: no 'image_processor' object inside")
            return cls.from_dict(d["image_processor"], f"{proc} (image_processor)")
        raise CheckpointError(f"{folder}: neither preprocessor_config.json nor processor_config.json found; "
                              "a Qwen3-VL checkpoint needs its image processor settings")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target ``(h', w')``: multiples of ``factor``, pixel count within ``[min_pixels, max_pixels]``, aspect
    kept as closely as possible (spec section 6.2; Python ``round``, halves to even)."""
    if height < 1 or width < 1:
        raise InputError(f"image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"image of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT}; "
                         "crop or pad it first")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def open_image(image) -> Image.Image:
    """A PIL image from a PIL image, bytes or a path, EXIF orientation applied (not yet RGB)."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image)
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, os.PathLike)):
            img = Image.open(image)
        else:
            raise InputError(f"an image must be a PIL image, bytes or a path, got {type(image).__name__}")
        img.load()
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot decode the image: {exc}") from exc
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode; transparency (an alpha band or a palette/`transparency` entry) is composited
    onto white, as transformers' image processor does."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def patchify(chw: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """``[C, H, W]`` float32 -> ``[gh*gw, C*T*P*P]`` in merge-block order, the frame repeated ``T`` times."""
    c, h, w = chw.shape
    gh, gw = h // patch, w // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # bh, bw, ih, iw, C, P, P
    x = np.repeat(x[:, :, :, :, :, None], temporal, axis=5)  # bh, bw, ih, iw, C, T, P, P
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal * patch * patch))


def process_image(image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> ``(pixel_values [n_patches, C*T*P*P] float32, grid_thw (1, h'/P, w'/P))``."""
    img = to_rgb(open_image(image))
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    img = img.resize((w, h), resample=Image.Resampling(cfg.resample))
    x = np.asarray(img).transpose(2, 0, 1)  # C, H, W uint8
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.array(cfg.image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(cfg.image_std, dtype=np.float32).reshape(3, 1, 1)
    x = (x - mean) / std
    patches = patchify(x, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return patches, (1, h // cfg.patch_size, w // cfg.patch_size)


def process_images(images: list, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> ``(pixel_values`` concatenated in image order, ``grid_thw [n_images, 3] int64)``."""
    if not images:
        raise InputError("process_images needs at least one image")
    out = [process_image(im, cfg) for im in images]
    return np.concatenate([p for p, _ in out]), np.array([g for _, g in out], dtype=np.int64)


def image_token_count(grid_thw, merge_size: int) -> int:
    """Merged tokens (``<|image_pad|>`` copies) of one image: ``t*h*w / m^2``."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)
