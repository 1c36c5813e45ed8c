"""CLIP preprocessing for LLaVA-1.5 (CLIP ViT-L/14-336 vision tower).

Pipeline of ``preprocess_image`` (LLaVA-1.5 ``process_images`` with ``image_aspect_ratio == "pad"``):

1. ``models.images.load_image``: decode and convert to RGB with ``PIL.Image.convert("RGB")`` semantics, as
   LLaVA's loader (``Image.open(...).convert("RGB")``) does (details there); an ``RGBImage`` (decoded once by
   ``decode_image``) is used as it is.
2. ``pad_to_square``: LLaVA's ``expand2square`` - a square canvas of side ``max(W, H)`` (that square,
   too, must fit ``max_pixels``: a 40000x1000 strip would need a 1.6 Gpx canvas) filled with
   the mean colour ``int(255 * m)`` per channel = (122, 116, 104), the image pasted at
   ``((S - W) // 2, (S - H) // 2)``. Skipped for ``aspect`` "square" / "none".
3. CLIP: resize so the shorter side is ``size`` with PIL bicubic (longer side
   ``int(size * long / short)``, the rule of transformers' ``get_resize_output_image_size`` with
   ``default_to_square=False``), centre crop ``crop_size`` (top/left offset ``(dim - crop) // 2``),
   ``uint8 -> float64 * (1/255) -> float32``, then ``(x - mean) / std`` in float32, CHW.

Step 3 repeats the arithmetic of transformers' ``CLIPImageProcessorPil`` (5.23) operation by
operation, so for an RGB input the output is bit-identical to it. The module knows nothing about
the vision tower or about dtypes beyond float32; casting to fp16 is the caller's job.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ..images import DEFAULT_MAX_PIXELS, ImageSource, RGBImage, check_pixels, check_positive_int, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECTS = ("pad", "square", "none")

def mean_fill(mean: Iterable[float] = CLIP_MEAN) -> tuple[int, ...]:
    """LLaVA's padding colour: ``tuple(int(m * 255) for m in mean)``; (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in mean)


CLIP_FILL = mean_fill(CLIP_MEAN)


# ---------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class ImageSpec:
    """How to turn an image into vision-tower input.

    ``size``: target of the shorter side after resizing (CLIP ``size.shortest_edge``).
    ``mean`` / ``std``: per-channel normalisation, also the source of the padding colour.
    ``aspect``: "pad" = LLaVA-1.5 expand-to-square with the mean colour before CLIP; "square" and
    "none" (synonyms) = plain CLIP resize + centre crop of the unpadded image.
    ``max_pixels``: refuse images with more than this many pixels (checked before decoding).
    ``resample``: PIL filter for the resize (3 = bicubic).
    ``crop_size``: side of the centre crop and of the output; ``None`` means ``size``.
    """

    size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    aspect: str = "pad"
    max_pixels: int = DEFAULT_MAX_PIXELS
    resample: int = Image.Resampling.BICUBIC
    crop_size: int | None = None

    def __post_init__(self) -> None:
        where = "ImageSpec"
        check_positive_int(self.size, f"{where}.size")
        if self.crop_size is not None:
            check_positive_int(self.crop_size, f"{where}.crop_size")
        check_positive_int(self.max_pixels, f"{where}.max_pixels")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                floats = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"{where}.{name} must be 3 numbers (one per RGB channel), got {value!r}"
                ) from exc
            if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
                raise InputError(
                    f"{where}.{name} must be 3 finite numbers (one per RGB channel), got {value!r}"
                )
            object.__setattr__(self, name, floats)
        if any(s == 0.0 for s in self.std):
            raise InputError(f"{where}.std must not contain 0 (it divides), got {self.std!r}")
        if self.aspect not in ASPECTS:
            raise InputError(
                f"{where}.aspect must be one of {ASPECTS}, got {self.aspect!r}; use 'pad' for "
                "LLaVA-1.5 (image_aspect_ratio='pad') and 'square' for plain CLIP preprocessing"
            )
        try:
            resample = Image.Resampling(int(self.resample))
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{where}.resample must be a PIL resampling filter (0..5; 3 = bicubic), "
                f"got {self.resample!r}"
            ) from exc
        object.__setattr__(self, "resample", resample)

    @property
    def output_size(self) -> int:
        """Side of the square output tensor (``crop_size``, or ``size`` when that is unset)."""
        return self.size if self.crop_size is None else self.crop_size

    @property
    def fill(self) -> tuple[int, ...]:
        """Padding colour for ``aspect == "pad"``: ``int(255 * m)`` per channel."""
        return mean_fill(self.mean)

    @classmethod
    def from_preprocessor_config(cls, d: Mapping[str, Any], aspect: str = "pad", **overrides: Any) -> "ImageSpec":
        """Build a spec from a CLIP ``preprocessor_config.json`` dict.

        Reads ``image_mean``, ``image_std``, ``size`` (an int, or ``{"shortest_edge": N}``),
        ``crop_size`` (an int, or ``{"height": N, "width": N}``) and ``resample``; missing keys take
        the CLIP-L/336 defaults. Settings this module cannot reproduce (resize to a fixed
        height x width, a non-square crop, a disabled step) raise ``InputError``. ``overrides`` are
        passed on to the constructor (e.g. ``max_pixels``).
        """
        where = "preprocessor config"
        if not isinstance(d, Mapping):
            raise InputError(f"{where} must be a dict (parsed preprocessor_config.json), got {type(d).__name__}")
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(flag, True) is False:
                raise InputError(
                    f"{where}: {flag}=false is not supported; gracevlm reproduces the CLIP pipeline "
                    "with resize, centre crop, rescale and normalise all enabled"
                )
        factor = d.get("rescale_factor")
        if factor is not None and not math.isclose(float(factor), 1 / 255, rel_tol=1e-12):
            raise InputError(f"{where}: rescale_factor must be 1/255 (got {factor!r})")

        size: int | None = None
        raw_size = d.get("size")
        if isinstance(raw_size, Mapping):
            keys = {k for k, v in raw_size.items() if v is not None}
            if keys == {"shortest_edge"}:
                size = raw_size["shortest_edge"]
            else:
                raise InputError(
                    f"{where}: size={dict(raw_size)!r} is not supported; only "
                    "{'shortest_edge': N} (resize the shorter side, keep the aspect ratio) is"
                )
        elif raw_size is not None:
            size = raw_size

        crop: int | None = None
        raw_crop = d.get("crop_size")
        if isinstance(raw_crop, Mapping):
            h, w = raw_crop.get("height"), raw_crop.get("width")
            if h is None or w is None or h != w:
                raise InputError(
                    f"{where}: crop_size={dict(raw_crop)!r} is not supported; it must be square "
                    "({'height': N, 'width': N})"
                )
            crop = h
        elif raw_crop is not None:
            crop = raw_crop

        kwargs: dict[str, Any] = {"aspect": aspect}
        if "image_mean" in d:
            kwargs["mean"] = tuple(d["image_mean"])
        if "image_std" in d:
            kwargs["std"] = tuple(d["image_std"])
        if size is not None:
            kwargs["size"] = size
        if crop is not None:
            # Keep crop_size unset when it equals size so that specs compare equal.
            kwargs["crop_size"] = None if crop == kwargs.get("size", cls.size) else crop
        if d.get("resample") is not None:
            kwargs["resample"] = d["resample"]
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_llava_config(
        cls,
        cfg: Mapping[str, Any] | Any,
        preprocessor_config: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> "ImageSpec":
        """Build a spec from a LLaVA ``config.json`` (dict, or an object with attributes).

        ``image_aspect_ratio == "pad"`` gives ``aspect="pad"``; anything else LLaVA's
        ``process_images`` treats as plain CLIP (``"square"``, missing, ``None``) gives
        ``aspect="square"``. LLaVA-1.6 ``"anyres*"`` tiling is not supported and raises.
        ``preprocessor_config`` (the vision tower's ``preprocessor_config.json``) overrides the
        CLIP-L/336 defaults for size, crop, mean, std and resample.
        """
        if isinstance(cfg, Mapping):
            ratio = cfg.get("image_aspect_ratio")
        else:
            ratio = getattr(cfg, "image_aspect_ratio", None)
        if isinstance(ratio, str) and ratio.startswith("anyres"):
            raise InputError(
                f"LLaVA config: image_aspect_ratio={ratio!r} (LLaVA-1.6 multi-tile) is not supported; "
                "gracevlm implements LLaVA-1.5 ('pad') and plain CLIP ('square') preprocessing"
            )
        aspect = "pad" if ratio == "pad" else "square"
        if preprocessor_config is not None:
            return cls.from_preprocessor_config(preprocessor_config, aspect=aspect, **overrides)
        return cls(aspect=aspect, **overrides)


# ---------------------------------------------------------------------------------------------
# Geometry


def pad_to_square(img: Image.Image, fill: int | tuple[int, ...] = CLIP_FILL) -> Image.Image:
    """LLaVA's ``expand2square``: a canvas of side ``max(W, H)`` in ``img.mode`` filled with
    ``fill``, ``img`` pasted at ``((S - W) // 2, (S - H) // 2)``. Square images are returned as is."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    try:
        canvas = Image.new(img.mode, (side, side), fill)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"pad_to_square: fill {fill!r} does not fit image mode {img.mode!r} ({exc}); "
            "convert the image to RGB first (load_image does)"
        ) from exc
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_output_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side = ``shortest_edge`` and the longer side
    ``int(shortest_edge * long / short)`` - transformers' ``get_resize_output_image_size`` rule with
    ``default_to_square=False`` (ties: width <= height counts the width as the short side)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_array(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre crop of an ``[H, W, C]`` array with transformers' offsets ``(dim - crop) // 2``; a side
    smaller than the crop is first zero-padded (``ceil`` of half the shortfall before it), as in
    ``transformers.image_transforms.center_crop``."""
    height, width = arr.shape[:2]
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    top_pad = math.ceil((new_h - height) / 2)
    left_pad = math.ceil((new_w - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = arr
    top += top_pad
    left += left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


# ---------------------------------------------------------------------------------------------
# Tensors


def normalize_array(arr: np.ndarray, mean: Iterable[float], std: Iterable[float]) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float32: ``float32(float64(x) * (1/255))``, then
    ``(x - mean) / std`` in float32 - the same operations, in the same precision, as transformers'
    ``rescale`` and ``normalize``."""
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(tuple(mean), dtype=np.float32)) / np.asarray(tuple(std), dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(source: ImageSource, spec: ImageSpec | None = None) -> torch.Tensor:
    """One image -> float32 ``[3, S, S]`` (``S = spec.output_size``, 336 by default).

    load (RGB) -> pad to square with the mean colour (``aspect == "pad"``) -> bicubic resize of the
    shorter side to ``spec.size`` -> centre crop -> /255 -> normalise -> CHW. Bit-identical to
    transformers' ``CLIPImageProcessorPil`` applied to the (padded) RGB image.
    """
    spec = ImageSpec() if spec is None else spec
    if not isinstance(spec, ImageSpec):
        raise InputError(f"spec must be an ImageSpec, got {type(spec).__name__}")
    if isinstance(source, RGBImage):  # decoded once by the caller (decode_image): use it as it is
        check_pixels(source.image, spec.max_pixels, "image")
        img = source.image
    else:
        img = load_image(source, max_pixels=spec.max_pixels)
    if spec.aspect == "pad":
        side = max(img.size)
        if side * side > spec.max_pixels:  # the canvas, not the image, is what takes the memory
            raise InputError(
                f"image of {img.width}x{img.height} would be padded to {side}x{side} = {side * side:,} pixels, "
                f"over the cap of {spec.max_pixels:,} (max_pixels); its longer side may be at most "
                f"{math.isqrt(spec.max_pixels)} - downscale or crop it")
        img = pad_to_square(img, spec.fill)
    new_w, new_h = resize_output_size(img.width, img.height, spec.size)
    if new_w * new_h > spec.max_pixels:
        # Only reachable without padding: a 1 x 1000 strip would be resized to 336 x 336000.
        raise InputError(
            f"image of {img.width}x{img.height} would be resized to {new_w}x{new_h} = {new_w * new_h:,} "
            f"pixels before the centre crop, over the cap of {spec.max_pixels:,} (max_pixels); its aspect "
            "ratio is too extreme for aspect='none' - use aspect='pad' or crop the image first"
        )
    img = img.resize((new_w, new_h), resample=spec.resample)
    arr = center_crop_array(np.asarray(img), spec.output_size, spec.output_size)
    return torch.from_numpy(normalize_array(arr, spec.mean, spec.std))


def preprocess_images(sources: Iterable[ImageSource], spec: ImageSpec | None = None) -> torch.Tensor:
    """A list of images -> float32 ``[N, 3, S, S]`` (``[0, 3, S, S]`` for an empty list). An error
    in one image is re-raised as ``InputError`` naming its index."""
    spec = ImageSpec() if spec is None else spec
    if isinstance(sources, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, RGBImage)) or hasattr(sources, "read"):
        raise InputError(
            "preprocess_images takes a list of images, got a single "
            f"{type(sources).__name__}; wrap it in a list or call preprocess_image"
        )
    items = list(sources)
    out = torch.empty((len(items), 3, spec.output_size, spec.output_size), dtype=torch.float32)
    for i, item in enumerate(items):
        try:
            out[i] = preprocess_image(item, spec)
        except InputError as exc:
            raise InputError(f"image {i} of {len(items)}: {exc}") from exc
    return out


__all__ = [
    "ASPECTS",
    "CLIP_FILL",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "ImageSpec",
    "center_crop_array",
    "load_image",
    "mean_fill",
    "normalize_array",
    "pad_to_square",
    "preprocess_image",
    "preprocess_images",
    "resize_output_size",
]
