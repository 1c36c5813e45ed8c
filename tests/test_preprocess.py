"""gracevlm.models.llava.processing: loading, LLaVA pad-to-square and CLIP preprocessing.

The CLIP part is checked bit for bit against transformers' PIL-backend ``CLIPImageProcessor``.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gracevlm.errors import InputError
from gracevlm.models.images import load_image
from gracevlm.models.llava.processing import (
    CLIP_FILL,
    CLIP_MEAN,
    CLIP_STD,
    ImageSpec,
    center_crop_array,
    pad_to_square,
    preprocess_image,
    preprocess_images,
    resize_output_size,
)

SIZES = [(336, 336), (500, 301), (123, 457), (5, 3), (1000, 700), (337, 1), (1, 1)]
NOPAD_SIZES = [(336, 336), (500, 301), (123, 457), (5, 3), (1000, 700), (337, 40), (1, 1)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * width + height)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return _fromarray(arr, "RGB")


def _fromarray(arr: np.ndarray, mode: str) -> Image.Image:
    img = Image.fromarray(arr)
    assert img.mode == mode
    return img


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width x height`` (its IDAT is nowhere near that big)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def clip_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=Image.Resampling.BICUBIC,
    )
    assert proc.backend == "pil"
    return proc


def _reference(proc, img: Image.Image) -> torch.Tensor:
    out = proc(images=[img], return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.asarray(out[0]))


# --------------------------------------------------------------------------------------------
# Bit-exactness against transformers


def test_plain_clip_image_processor_falls_back_to_pil_backend():
    pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision installed: CLIPImageProcessor uses the torchvision backend")
    import transformers

    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336)
    assert proc.backend == "pil"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pad_matches_clip_processor_on_padded_image(clip_processor, size):
    img = _noise(*size)
    ours = preprocess_image(img)
    assert ours.dtype == torch.float32 and ours.shape == (3, 336, 336)
    ref = _reference(clip_processor, pad_to_square(img, CLIP_FILL))
    assert ref.dtype == torch.float32
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"


@pytest.mark.parametrize("aspect", ["none", "square"])
@pytest.mark.parametrize("size", NOPAD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_no_pad_matches_clip_center_crop_of_unpadded_image(clip_processor, size, aspect):
    img = _noise(*size, seed=1)
    ours = preprocess_image(img, ImageSpec(aspect=aspect))
    ref = _reference(clip_processor, img)
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"
    if size[0] != size[1]:
        assert not torch.equal(ours, preprocess_image(img))


def test_pad_region_holds_normalised_mean_colour():
    out = preprocess_image(_noise(600, 200, seed=2))  # -> 600x600 canvas, image in rows 200..399
    for c in range(3):
        expected = np.float32((np.float32(CLIP_FILL[c] / 255) - np.float32(CLIP_MEAN[c])) / np.float32(CLIP_STD[c]))
        assert out[c, :100, :].eq(float(expected)).all()
        assert out[c, -100:, :].eq(float(expected)).all()


def test_resize_rule_matches_transformers():
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    rng = np.random.default_rng(5)
    pairs = [(w, h) for w in range(1, 40) for h in range(1, 40)]
    pairs += [tuple(int(v) for v in rng.integers(1, 5000, size=2)) for _ in range(2000)]
    for w, h in pairs:
        dummy = np.empty((1, h, w), dtype=np.uint8)
        th, tw = get_resize_output_image_size(dummy, 336, default_to_square=False, input_data_format=ChannelDimension.FIRST)
        assert resize_output_size(w, h, 336) == (tw, th), (w, h)


@pytest.mark.parametrize("shape,crop", [((10, 7), (4, 4)), ((11, 8), (5, 3)), ((3, 9), (6, 4)), ((2, 2), (5, 7))])
def test_center_crop_matches_transformers(shape, crop):
    from transformers.image_transforms import center_crop
    from transformers.image_utils import ChannelDimension

    arr = np.arange(shape[0] * shape[1] * 3, dtype=np.uint8).reshape(shape[0], shape[1], 3) + 1
    ref = center_crop(arr, crop, input_data_format=ChannelDimension.LAST)
    assert np.array_equal(center_crop_array(arr, *crop), ref)


def test_crop_larger_than_resize_pads_like_transformers(clip_processor):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = _noise(40, 25, seed=3)
    spec = ImageSpec(size=16, crop_size=20, aspect="none")
    ref_proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 20, "width": 20})
    ours = preprocess_image(img, spec)
    assert ours.shape == (3, 20, 20)
    assert torch.equal(ours, _reference(ref_proc, img))


# --------------------------------------------------------------------------------------------
# pad_to_square


def test_pad_to_square_wide():
    img = Image.new("RGB", (4, 2), (1, 2, 3))
    out = np.asarray(pad_to_square(img))
    assert out.shape == (4, 4, 3)
    for row in (0, 3):
        assert (out[row] == (122, 116, 104)).all()
    assert (out[1:3] == (1, 2, 3)).all()


def test_pad_to_square_odd_offsets():
    wide = np.asarray(pad_to_square(Image.new("RGB", (5, 2), (9, 9, 9))))  # offset (0, 3 // 2 = 1)
    assert [tuple(wide[r, 0]) for r in range(5)] == [CLIP_FILL, (9, 9, 9), (9, 9, 9), CLIP_FILL, CLIP_FILL]
    tall = np.asarray(pad_to_square(Image.new("RGB", (2, 5), (7, 7, 7))))  # offset (1, 0)
    assert [tuple(tall[0, c]) for c in range(5)] == [CLIP_FILL, (7, 7, 7), (7, 7, 7), CLIP_FILL, CLIP_FILL]


def test_pad_to_square_square_is_unchanged_and_fill_colour():
    img = Image.new("RGB", (3, 3), (5, 6, 7))
    assert pad_to_square(img) is img
    assert CLIP_FILL == (122, 116, 104) == ImageSpec().fill
    red = np.asarray(pad_to_square(Image.new("RGB", (1, 3)), fill=(255, 0, 0)))
    assert tuple(red[0, 0]) == (255, 0, 0) and tuple(red[0, 1]) == (0, 0, 0)


# --------------------------------------------------------------------------------------------
# Modes x sources


def _mode_cases():
    """(name, PIL image, encoding format or None for PIL-only, expected [H, W, 3] uint8)."""
    cases = []
    rgb = np.array([[[10, 20, 30], [200, 100, 0]]], dtype=np.uint8)
    cases.append(("RGB", _fromarray(rgb, "RGB"), "PNG", rgb))
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    cases.append(("RGBA", _fromarray(rgba, "RGBA"), "PNG", rgba[..., :3]))  # alpha dropped, not composited
    la = np.array([[[50, 0], [250, 255]]], dtype=np.uint8)
    cases.append(("LA", _fromarray(la, "LA"), "PNG", np.repeat(la[..., :1], 3, axis=-1)))
    pal = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    p = Image.frombytes("P", (2, 1), bytes([0, 2]))
    p.putpalette(pal)
    cases.append(("P", p, "PNG", np.array([[[10, 20, 30], [70, 80, 90]]], dtype=np.uint8)))
    pt = p.copy()
    pt.info["transparency"] = 0
    cases.append(("P+transparency", pt, "PNG", np.array([[[10, 20, 30], [70, 80, 90]]], dtype=np.uint8)))
    pa = Image.new("PA", (2, 1))
    pa.putpalette(pal)
    pa.putpixel((1, 0), (1, 0))
    cases.append(("PA", pa, None, np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8)))
    grey = np.array([[0, 77], [255, 128]], dtype=np.uint8)
    cases.append(("L", _fromarray(grey, "L"), "PNG", np.repeat(grey[..., None], 3, axis=-1)))
    one = Image.new("1", (3, 1), 0)
    one.putpixel((1, 0), 1)
    cases.append(("1", one, "PNG", np.array([[[0] * 3, [255] * 3, [0] * 3]], dtype=np.uint8)))
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 128, 10))
    cases.append(("CMYK", cmyk, "TIFF", np.asarray(cmyk.convert("RGB"))))
    i16 = np.array([[0, 65535, 257, 32896, 128, 129]], dtype=np.uint16)
    exp16 = np.array([[0, 255, 1, 128, 0, 1]], dtype=np.uint8)
    cases.append(("I;16", _fromarray(i16, "I;16"), "PNG", np.repeat(exp16[..., None], 3, axis=-1)))
    i32 = np.array([[-5, 0, 65535, 70000, 257]], dtype=np.int32)
    exp32 = np.array([[0, 0, 255, 255, 1]], dtype=np.uint8)
    cases.append(("I", _fromarray(i32, "I"), "TIFF", np.repeat(exp32[..., None], 3, axis=-1)))
    f = np.array([[-5.0, 0.5, 1.5, 254.9, 300.0, np.nan]], dtype=np.float32)
    expf = np.array([[0, 0, 1, 254, 255, 0]], dtype=np.uint8)
    cases.append(("F", _fromarray(f, "F"), "TIFF", np.repeat(expf[..., None], 3, axis=-1)))
    return cases


MODE_CASES = _mode_cases()


SOURCE_KINDS = ["pil", "path", "bytes", "bytearray", "memoryview", "fileobj", "bytesio"]
# PA has no lossless on-disk format in PIL, so it is only tested as a PIL image.
MODE_SOURCE_PARAMS = [
    pytest.param(case, kind, id=f"{case[0]}-{kind}")
    for case in MODE_CASES
    for kind in SOURCE_KINDS
    if kind == "pil" or case[2] is not None
]


@pytest.mark.parametrize("case,kind", MODE_SOURCE_PARAMS)
def test_every_mode_from_every_source(case, kind, tmp_path):
    name, img, fmt, expected = case
    if kind == "pil":
        source = img
    else:
        data = _encode(img, fmt)
        if kind == "path":
            source = tmp_path / f"img.{fmt.lower()}"
            source.write_bytes(data)
        elif kind == "bytes":
            source = data
        elif kind == "bytearray":
            source = bytearray(data)
        elif kind == "memoryview":
            source = memoryview(data)
        elif kind == "fileobj":
            path = tmp_path / "img.bin"
            path.write_bytes(data)
            source = open(path, "rb")  # noqa: SIM115 - closed below
        else:
            source = io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning must not leak
        out = load_image(source)
    if kind == "fileobj":
        assert not source.closed  # the caller's file object is left open
        source.close()
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), expected)


def test_str_path_and_pil_input_not_modified(tmp_path):
    img = _fromarray(np.array([[[1, 2, 3, 4]]], dtype=np.uint8), "RGBA")
    path = tmp_path / "x.png"
    img.save(path)
    assert np.array_equal(np.asarray(load_image(str(path))), [[[1, 2, 3]]])
    out = load_image(img)
    assert img.mode == "RGBA" and out is not img


def test_float_mode_matches_pil_convert_for_finite_values():
    f = np.linspace(-10, 270, 57, dtype=np.float32).reshape(3, 19)
    img = _fromarray(f, "F")
    assert np.array_equal(np.asarray(load_image(img)), np.asarray(img.convert("RGB")))


def test_exif_orientation_not_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(_noise(40, 20), "JPEG", exif=exif)
    assert load_image(data).size == (40, 20)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    data = buf.getvalue()
    assert tuple(np.asarray(load_image(data))[0, 0]) == (255, 0, 0)
    anim = Image.open(io.BytesIO(data))
    anim.seek(1)
    assert tuple(np.asarray(load_image(anim))[0, 0]) == (255, 0, 0)
    assert anim.tell() == 1


# --------------------------------------------------------------------------------------------
# Errors


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.jpg.*empty \(0 bytes\), not a decodable image"):
        load_image(path)
    with pytest.raises(InputError, match=r"<bytes, 0 bytes> is empty"):
        load_image(b"")


def test_random_bytes():
    data = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    with pytest.raises(InputError, match=r"<bytes, 64 bytes> is not a decodable image"):
        load_image(data)


def test_truncated_png(tmp_path):
    data = _encode(_noise(64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png.*is not a decodable image.*truncated or corrupt"):
        load_image(path)
    with pytest.raises(InputError, match=r"<bytes, \d+ bytes> is not a decodable image"):
        load_image(data[: len(data) // 2])


def test_missing_path_directory_url_and_bad_types(tmp_path):
    with pytest.raises(InputError, match=r"nope\.png' does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="is a URL"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(InputError, match="type ndarray is not supported.*fromarray"):
        load_image(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="text mode"):
        load_image(io.StringIO("abc"))


def test_header_over_cap_refused_before_decoding():
    # 9000 x 9000 = 81M: under PIL's own limit (~89M) but over the 64M default cap. The IDAT is
    # bogus, so reaching the decoder would give "not decodable" instead.
    with pytest.raises(InputError, match=r"9000x9000 = 81,000,000 pixels, over the cap of 64,000,000"):
        load_image(_png_with_header(9000, 9000))


def test_pil_decompression_bomb_becomes_input_error():
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(_png_with_header(100_000, 100_000))
    with pytest.raises(InputError, match="decompression bomb"):  # PIL's warning band (89M..179M)
        load_image(_png_with_header(10_000, 10_000), max_pixels=500_000_000)


def test_small_cap_on_real_image(tmp_path):
    big = Image.new("1", (4000, 3000))
    path = tmp_path / "big.png"
    big.save(path)
    with pytest.raises(InputError, match=r"big\.png' is 4000x3000 = 12,000,000 pixels, over the cap of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(InputError, match="over the cap"):
        preprocess_image(big, ImageSpec(max_pixels=1_000_000))


def test_extreme_aspect_without_padding_hits_cap_on_resized_size():
    strip = _noise(337, 1)
    with pytest.raises(InputError, match=r"337x1 would be resized to 113232x336 = 38,045,952 pixels.*aspect='pad'"):
        preprocess_image(strip, ImageSpec(aspect="none", max_pixels=1_000_000))
    assert preprocess_image(strip, ImageSpec(max_pixels=1_000_000)).shape == (3, 336, 336)  # padded: fine


def test_unconvertible_mode():
    with pytest.raises(InputError, match="mode 'La'"):
        load_image(Image.new("La", (2, 2)))


# --------------------------------------------------------------------------------------------
# Batch and spec


def test_preprocess_images_stacks_and_names_failing_index():
    imgs = [_noise(50, 30), _encode(_noise(20, 60))]
    batch = preprocess_images(imgs)
    assert batch.shape == (2, 3, 336, 336) and batch.dtype == torch.float32
    assert torch.equal(batch[0], preprocess_image(imgs[0])) and torch.equal(batch[1], preprocess_image(imgs[1]))
    assert preprocess_images([]).shape == (0, 3, 336, 336)
    with pytest.raises(InputError, match=r"image 1 of 2: image <bytes, 3 bytes> is not a decodable"):
        preprocess_images([imgs[0], b"abc"])
    with pytest.raises(InputError, match="takes a list"):
        preprocess_images("cat.png")


CLIP_336_PREPROCESSOR = {  # openai/clip-vit-large-patch14-336 preprocessor_config.json (old style)
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "resample": 3,
    "size": 336,
}


def test_spec_from_configs():
    assert ImageSpec.from_llava_config({"image_aspect_ratio": "pad"}) == ImageSpec()
    assert ImageSpec.from_llava_config({"image_aspect_ratio": "square"}).aspect == "square"
    assert ImageSpec.from_llava_config({}).aspect == "square"
    assert ImageSpec.from_llava_config({"image_aspect_ratio": None}).aspect == "square"
    with pytest.raises(InputError, match="anyres"):
        ImageSpec.from_llava_config({"image_aspect_ratio": "anyres"})
    spec = ImageSpec.from_llava_config({"image_aspect_ratio": "pad"}, CLIP_336_PREPROCESSOR)
    assert spec == ImageSpec()
    new_style = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3}
    spec = ImageSpec.from_preprocessor_config(new_style, aspect="none", max_pixels=10)
    assert (spec.size, spec.output_size, spec.mean, spec.std, spec.aspect, spec.max_pixels) == (
        224, 224, (0.5, 0.5, 0.5), CLIP_STD, "none", 10,
    )
    assert spec.fill == (127, 127, 127)
    with pytest.raises(InputError, match="height': 224, 'width': 200"):
        ImageSpec.from_preprocessor_config({"crop_size": {"height": 224, "width": 200}})
    with pytest.raises(InputError, match="shortest_edge"):
        ImageSpec.from_preprocessor_config({"size": {"height": 224, "width": 224}})
    with pytest.raises(InputError, match="do_center_crop=false"):
        ImageSpec.from_preprocessor_config({"do_center_crop": False})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"size": 0}, "size must be a positive integer"),
        ({"aspect": "letterbox"}, "aspect must be one of"),
        ({"std": (1.0, 0.0, 1.0)}, "must not contain 0"),
        ({"mean": (0.5, 0.5)}, "3 finite numbers"),
        ({"max_pixels": -1}, "max_pixels must be a positive integer"),
        ({"resample": 42}, "resampling filter"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        ImageSpec(**kwargs)
