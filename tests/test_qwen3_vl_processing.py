"""Qwen3-VL image processing against transformers' Qwen2VLImageProcessor (PIL backend), bit for bit."""
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from gracevlm.errors import CheckpointError, InputError
from gracevlm.models.qwen3_vl.processing import ImageProcessorConfig, process_images, smart_resize

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil, smart_resize as hf_smart_resize)

PROC_KW = dict(patch_size=4, merge_size=2, temporal_patch_size=2,
               size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48},
               image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3vl_proc")
    Qwen2VLImageProcessorPil(**PROC_KW).save_pretrained(path)
    return path


def _image(w, h, mode, seed):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
        return img
    arr = rng.integers(0, 256, (h, w, channels[mode]), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels[mode] == 1 else arr, mode=mode)


@pytest.mark.parametrize("size,mode", [((37, 53), "RGB"), ((64, 64), "RGB"), ((200, 30), "RGBA"),
                                       ((9, 11), "L"), ((120, 80), "P"), ((45, 70), "CMYK"), ((33, 90), "LA"),
                                       ((31, 31), "RGB")])
def test_pixels_and_grid_equal_transformers(folder, size, mode):
    img = _image(*size, mode, seed=sum(size))
    ref = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=[img], return_tensors="np")
    cfg = ImageProcessorConfig.from_folder(folder)
    pixels, grid = process_images([img], cfg)
    assert pixels.dtype == np.float32
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert np.array_equal(pixels, ref["pixel_values"])


def test_two_images_and_palette_transparency(folder):
    pal = _image(50, 40, "P", 3)
    pal.info["transparency"] = 7
    imgs = [pal, _image(70, 21, "RGB", 4)]
    ref = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=imgs, return_tensors="np")
    pixels, grid = process_images(imgs, ImageProcessorConfig.from_folder(folder))
    assert grid.tolist() == ref["image_grid_thw"].tolist() and len(grid) == 2
    assert np.array_equal(pixels, ref["pixel_values"])


def test_exif_orientation_applied_from_bytes(folder):
    img = _image(60, 30, "RGB", 5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    data = buf.getvalue()
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (30, 60)
    ref = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=[upright], return_tensors="np")
    pixels, grid = process_images([data], ImageProcessorConfig.from_folder(folder))
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert np.array_equal(pixels, ref["pixel_values"])


def test_smart_resize_matches_reference_formula():
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = sorted(int(v) for v in rng.integers(32 * 32, 1600 * 1600, 2))
        assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi), (h, w, lo, hi)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500, 32, 1024, 1 << 20)


def test_nested_processor_config_and_bad_fields(tmp_path, folder):
    d = json.loads((folder / "preprocessor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": d}))
    cfg = ImageProcessorConfig.from_folder(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == (256, 2304, 4)
    bad = dict(d, size={"shortest_edge": 256})
    with pytest.raises(CheckpointError, match="longest_edge"):
        ImageProcessorConfig.from_dict(bad, "x.json")
    with pytest.raises(CheckpointError, match="image_std"):
        ImageProcessorConfig.from_dict(dict(d, image_std=[0.5, 0.5]), "x.json")
    with pytest.raises(CheckpointError, match="neither"):
        ImageProcessorConfig.from_folder(tmp_path / "nothing")
    with pytest.raises(InputError, match="cannot decode"):
        process_images([b"not an image"], cfg)
