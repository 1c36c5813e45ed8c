"""Exact-match accuracy of a checkpoint on the demo world's held-out questions, generated live.

Each held-out record is one image and one question; the model answers through
``gracevlm.load(...).generate`` (greedy, the checkpoint's conversation template), the answer is compared
with the reference after ``str.strip()`` (what LLaVA's evaluation scripts apply to the outputs).
"""
from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from .world import draw_scene, generate_split

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_HELDOUT = 400
DEFAULT_SEED = 0


def evaluate(model: str | os.PathLike | object = MODEL_DIR, n: int = DEFAULT_HELDOUT, seed: int = DEFAULT_SEED,
             quantize: str | None = None, max_new_tokens: int = 8, backend: str | None = None,
             image_size: int | None = None, progress: bool = False) -> dict:
    """Score ``model`` (a checkpoint folder or an already loaded ``VLM``) on ``n`` held-out questions.

    Returns ``{"accuracy": percent, "n": n, "correct": k, "by_type": {type: percent}, "seconds": s}``.
    """
    from ..engine.vlm import VLM, load

    vlm = model if isinstance(model, VLM) else load(model, device="cpu", backend=backend, quantize=quantize)
    size = image_size or vlm.model.vision_tower.config.image_size
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
        out = vlm.generate(question, images=[draw_scene(scene, size)], max_new_tokens=max_new_tokens,
                           temperature=0.0)
        totals[kind] += 1
        hits[kind] += int(out.text.strip() == answer.strip())
    correct = sum(hits.values())
    return {"accuracy": round(100.0 * correct / max(1, n), 2), "n": n, "correct": correct,
            "by_type": {k: round(100.0 * hits[k] / totals[k], 1) for k in sorted(totals)},
            "seconds": round(time.perf_counter() - t0, 1)}
