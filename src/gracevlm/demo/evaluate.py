"""Exact-match accuracy of a checkpoint on the demo world's held-out questions, generated live.

Each held-out record is one image and one question; the model answers through
``gracevlm.load(...).generate`` (greedy, the checkpoint's conversation template), the answer is compared
with the reference after ``str.strip()`` (what LLaVA's evaluation scripts apply to the outputs).
The picture is drawn at a chosen *view* (width x height in pixels) and goes through the checkpoint's
normal preprocessing (LLaVA's pad-to-square with the CLIP mean colour, bicubic resize), so the same
questions can be asked of 64 px, 256 px or non-square pictures.
"""
from __future__ import annotations

import collections
import math
import os
import time
from pathlib import Path

from .world import draw_scene, generate_split

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_HELDOUT = 400
DEFAULT_SEED = 0
# the robustness views: square pictures at other sizes and non-square ones (padded as LLaVA pads)
VIEWS = ((64, 64), (128, 128), (200, 200), (256, 256), (200, 150), (150, 200), (256, 192))


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``correct / n``, in percent (0..100)."""
    if n <= 0:
        return (0.0, 100.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2))


def parse_view(text: str) -> tuple[int, int]:
    """``"200"`` -> (200, 200); ``"200x150"`` -> (200, 150). Raises ValueError with a one-line reason."""
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"picture size must be N or WxH (e.g. 200x150), got {text!r}") from None
    if len(dims) not in (1, 2) or min(dims) < 16 or max(dims) > 4096:
        raise ValueError(f"picture size must be N or WxH with sides from 16 to 4096 pixels, got {text!r}")
    return (dims[0], dims[-1])


def evaluate(model: str | os.PathLike | object = MODEL_DIR, n: int = DEFAULT_HELDOUT, seed: int = DEFAULT_SEED,
             quantize: str | None = None, max_new_tokens: int = 8, backend: str | None = None,
             image_size: int | None = None, view: tuple[int, int] | None = None, progress: bool = False) -> dict:
    """Score ``model`` (a checkpoint folder, or a loaded ``VLM`` or anything with its ``generate(question,
    images=[PIL image], ...) -> .text``) on ``n`` held-out questions, the pictures drawn at ``view`` =
    (width, height) (default: ``image_size`` square, default the tower's size).

    Returns ``{"accuracy": percent, "ci95": [lo, hi], "n": n, "correct": k, "by_type": {type: percent},
    "view": [w, h], "seconds": s}``.
    """
    from ..engine.vlm import load

    vlm = model if hasattr(model, "generate") else load(model, device="cpu", backend=backend, quantize=quantize)
    if view is None:
        side = image_size or vlm.model.vision_tower.config.image_size
        view = (side, side)
    records = generate_split("heldout", n, seed)
    hits: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="evaluate", unit="q")
    for record, scene in iterator:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        answer = record["conversations"][1]["value"]
        kind = record["types"][0]
        out = vlm.generate(question, images=[draw_scene(scene, *view)], max_new_tokens=max_new_tokens,
                           temperature=0.0)
        totals[kind] += 1
        hits[kind] += int(out.text.strip() == answer.strip())
    correct = sum(hits.values())
    return {"accuracy": round(100.0 * correct / max(1, n), 2), "ci95": list(wilson_interval(correct, n)), "n": n,
            "correct": correct, "by_type": {k: round(100.0 * hits[k] / totals[k], 1) for k in sorted(totals)},
            "view": list(view), "seconds": round(time.perf_counter() - t0, 1)}


def evaluate_views(model: str | os.PathLike | object = MODEL_DIR, views=VIEWS, n: int = DEFAULT_HELDOUT,
                   seed: int = DEFAULT_SEED, quantize: str | None = None, backend: str | None = None) -> dict:
    """``evaluate`` at each view (the model loaded once); ``{"WxH": result}`` in the order of ``views``."""
    from ..engine.vlm import load

    vlm = model if hasattr(model, "generate") else load(model, device="cpu", backend=backend, quantize=quantize)
    return {f"{w}x{h}": evaluate(vlm, n=n, seed=seed, view=(w, h)) for w, h in views}
