"""``eval run``: generate answers for a benchmark's items into a resumable LLaVA-style answers file."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import uuid
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import InputError
from .answers import (AnswerWriter, answered_keys, get_chunk, manifest_path, occurrence_keys, read_json,
                      repair_tail, sha256_file, write_json_atomic)
from .common import Item
from .lock import answers_lock
from .prompting import DEFAULT_STYLE, max_new_tokens, recorded_answer, resolve_prompts, styled_item

Generator = Callable[[Item], str]


@dataclass
class RunConfig:
    benchmark: str
    answers_file: str
    question_file: str | None = None
    model: str | None = None
    endpoint: str | None = None
    api_key: str | None = None
    served_model: str | None = None
    device: str = "auto"
    backend: str | None = None
    conv_mode: str | None = None
    temperature: float = 0.0
    max_new_tokens: int | None = None  # None: the prompt style's budget for the benchmark, else the benchmark's
    prompt_style: str | None = None    # None / "model": the loaded model's family's (endpoints: llava-1.5)
    num_chunks: int = 1
    chunk_idx: int = 0
    limit: int | None = None
    concurrency: int = 1
    timeout: float = 600.0
    progress: bool = True
    prefix_cache_gib: float = 2.0  # in-process models: the engine's prefix cache (engine.prefix_cache)
    options: dict = field(default_factory=dict)   # benchmark-specific (image folder, rounds, lang, split, ...)


def model_name_from_path(path: str) -> str:
    """LLaVA's model_id: the last path component, or ``parent_checkpoint-N`` for a ``checkpoint-N`` folder."""
    parts = str(path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class ModelGenerator:
    """In-process generation through ``gracevlm.load`` (greedy when temperature is 0), in the model's family's
    prompt style unless ``cfg.prompt_style`` names another."""

    def __init__(self, cfg: RunConfig):
        from .. import load

        self.vlm = load(cfg.model, device=cfg.device, backend=cfg.backend, prefix_cache_gib=cfg.prefix_cache_gib)
        self.conv_mode = cfg.conv_mode or self.vlm.conv_mode
        self.prompts = resolve_prompts(cfg.prompt_style, self.vlm.benchmark_prompts)
        self.max_new_tokens = max_new_tokens(cfg.benchmark, self.prompts, cfg.max_new_tokens)
        self.temperature = cfg.temperature
        self.model_id = model_name_from_path(cfg.model)

    def __call__(self, item: Item) -> str:
        images = [] if item.image is None else [item.image]
        gen = self.vlm.generate(item.user_message, images=images, conv_mode=self.conv_mode,
                                max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        return gen.text.strip()


class EndpointGenerator:
    """Generation through an OpenAI-compatible server: the user message's text (without the leading
    ``<image>\\n`` placeholder) plus the image as a base64 part, in ``cfg.prompt_style`` (default llava-1.5)."""

    def __init__(self, cfg: RunConfig):
        from .client import EndpointClient

        self.client = EndpointClient(cfg.endpoint, cfg.api_key, cfg.served_model, timeout=cfg.timeout)
        self.conv_mode = None
        self.prompts = resolve_prompts(cfg.prompt_style)
        self.max_new_tokens = max_new_tokens(cfg.benchmark, self.prompts, cfg.max_new_tokens)
        self.temperature = cfg.temperature
        self.model_id = model_name_from_path(self.client.model)

    def __call__(self, item: Item) -> str:
        text = item.user_message
        if item.image is not None and text.startswith("<image>\n"):
            text = text[len("<image>\n"):]
        return self.client.complete(text, item.image, self.max_new_tokens, self.temperature)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _manifest(cfg: RunConfig, model_id: str, conv_mode: str | None, n_items: int, style: str | None,
              new_tokens: int | None) -> dict:
    import torch

    qf = cfg.question_file
    return {
        "gracevlm_version": __version__, "benchmark": cfg.benchmark, "model": cfg.model,
        "endpoint": cfg.endpoint, "served_model": cfg.served_model if cfg.endpoint else None, "model_id": model_id,
        "conv_mode": conv_mode, "prompt_style": style,
        "decoding": {"temperature": cfg.temperature, "max_new_tokens": new_tokens, "num_beams": 1,
                     "do_sample": cfg.temperature > 0},
        "question_file": str(qf) if qf else None,
        "question_file_sha256": sha256_file(qf) if qf and Path(qf).is_file() else None,
        "options": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in cfg.options.items()},
        "num_chunks": cfg.num_chunks, "chunk_idx": cfg.chunk_idx, "limit": cfg.limit, "items": n_items,
        "device": cfg.device if cfg.model else None, "python": platform.python_version(),
        "torch": torch.__version__,
    }


_MUST_MATCH = ("benchmark", "model", "endpoint", "conv_mode", "prompt_style", "decoding", "question_file_sha256",
               "options", "num_chunks", "chunk_idx")


def _check_resume(old: dict, new: dict, answers_file: Path) -> None:
    old = {"prompt_style": DEFAULT_STYLE, **old}  # manifests from before prompt styles: LLaVA-1.5's
    diffs = [k for k in _MUST_MATCH if old.get(k) != new.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs)
        raise InputError(f"{answers_file} holds answers made with other settings ({detail}); resuming would mix "
                         "them. Use another --answers-file, or delete the old one to start over")


def run(cfg: RunConfig, questions: list[list[Item]], generator: Generator | None = None) -> dict:
    """Answer ``questions`` (each a list of items; chunking works on questions) into ``cfg.answers_file``.

    Answers already in the file are skipped (keys: question id + occurrence); a partial last line left by a kill
    is cut first. Each answer is flushed and fsync'ed before the next starts, in question order, so a killed run
    loses at most the answers in flight. One run at a time per answers file (``lock.answers_lock``): a second
    run on the same file raises ``InputError`` at once.
    """
    with answers_lock(cfg.answers_file):
        return _run_locked(cfg, questions, generator)


def _run_locked(cfg: RunConfig, questions: list[list[Item]], generator: Generator | None) -> dict:
    if cfg.limit is not None:
        if cfg.limit < 0:
            raise InputError(f"--limit must be >= 0, got {cfg.limit}")
        questions = questions[:cfg.limit]
    questions = get_chunk(questions, cfg.num_chunks, cfg.chunk_idx)
    items = [it for q in questions for it in q]
    keys = occurrence_keys(it.question_id for it in items)
    answers_file = Path(cfg.answers_file)

    if generator is None:
        if bool(cfg.model) == bool(cfg.endpoint):
            raise InputError("give exactly one of --model (in-process) or --endpoint (OpenAI-compatible server)")
        if cfg.model and cfg.concurrency > 1:
            raise InputError("--concurrency applies to --endpoint runs; an in-process model answers one at a time")
    if cfg.concurrency < 1:
        raise InputError(f"--concurrency must be >= 1, got {cfg.concurrency}")

    cut = repair_tail(answers_file)
    done_keys, bad = answered_keys(answers_file)
    done = set(done_keys)
    todo = [(it, k) for it, k in zip(items, keys) if k not in done]
    missing_images = [it.image for it, _ in todo if isinstance(it.image, str) and not os.path.isfile(it.image)]
    if missing_images:
        raise InputError(f"{len(missing_images)} image files not found (first: {missing_images[:3]}); "
                         "check --image-folder")

    gen = generator
    if gen is None and todo:
        gen = ModelGenerator(cfg) if cfg.model else EndpointGenerator(cfg)
    model_id = getattr(gen, "model_id", None) or (model_name_from_path(cfg.model) if cfg.model else
                                                  (cfg.served_model or "endpoint"))
    conv_mode = getattr(gen, "conv_mode", cfg.conv_mode)
    prompts = getattr(gen, "prompts", None)
    if prompts is None and (gen is not None or cfg.prompt_style not in (None, "", "model")):
        prompts = resolve_prompts(cfg.prompt_style)
    new_tokens = getattr(gen, "max_new_tokens", None)
    if new_tokens is None and prompts is not None:
        new_tokens = max_new_tokens(cfg.benchmark, prompts, cfg.max_new_tokens)
    styled = [styled_item(cfg.benchmark, it, prompts) for it, _ in todo]  # bad items refused before any write
    mpath = manifest_path(answers_file)
    manifest = _manifest(cfg, model_id, conv_mode, len(items), prompts.style if prompts else None,
                         new_tokens if new_tokens is not None else cfg.max_new_tokens)
    if mpath.is_file() and done_keys:
        old = read_json(mpath, what="manifest")
        if gen is None:  # nothing to generate: keep what the run recorded where no model says otherwise
            manifest["conv_mode"] = old.get("conv_mode")
            if prompts is None:
                manifest["prompt_style"] = old.get("prompt_style", DEFAULT_STYLE)
            if new_tokens is None and cfg.max_new_tokens is None:
                manifest["decoding"]["max_new_tokens"] = old.get("decoding", {}).get("max_new_tokens")
        _check_resume(old, manifest, answers_file)
        manifest["created"] = old.get("created")
    else:
        manifest["created"] = _now()
    manifest["resumed_from"] = len(done_keys)
    manifest["updated"] = _now()
    manifest["complete"] = not todo
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mpath, manifest)

    generated = 0
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"eval {cfg.benchmark}", unit="q",
                   disable=not cfg.progress, dynamic_ncols=True)
        try:
            with AnswerWriter(answers_file) as writer:
                for item, text in _generate_in_order(styled, gen, cfg.concurrency):
                    answer, raw = recorded_answer(cfg.benchmark, item, prompts, text)
                    writer.write(item.record(answer, uuid.uuid4().hex[:22], model_id, raw_text=raw))
                    generated += 1
                    bar.update(1)
        finally:
            bar.close()
            manifest["updated"] = _now()
            manifest["complete"] = generated == len(todo)
            manifest["answered"] = len(done_keys) + generated
            write_json_atomic(mpath, manifest)
    final = done_keys + [k for _, k in todo[:generated]]
    return {"benchmark": cfg.benchmark, "answers_file": str(answers_file), "manifest": str(mpath),
            "items": len(items), "already_answered": len(done_keys), "generated": generated,
            "complete": generated == len(todo), "unparsable_lines_kept": bad, "partial_line_bytes_cut": cut,
            "answers_in_question_order": final == keys[:len(final)]}


GROUP_WINDOW = 64  # items reordered together at most (bounds the answers held back before writing)


def _image_group(item: Item):
    if isinstance(item.image, bytes):
        return hashlib.blake2b(item.image, digest_size=16).digest()
    return item.image


def generation_order(items: list[Item], window: int = GROUP_WINDOW) -> list[int]:
    """Indices of ``items`` in the order to generate them: within each run of ``window`` items, the questions
    about one image come together (first-seen image first, question order kept inside a group), so the prefix
    cache prefills that image once and the next questions hit it."""
    order = []
    for start in range(0, len(items), window):
        groups: dict = {}
        for i in range(start, min(len(items), start + window)):
            groups.setdefault(_image_group(items[i]), []).append(i)
        for members in groups.values():
            order += members
    return order


def _generate_in_order(items: list[Item], gen: Generator, concurrency: int, window: int = GROUP_WINDOW):
    """Yield (item, text) in item order, generating in ``generation_order`` (answers that come early wait,
    at most ``window`` of them); with concurrency > 1 up to 2x that many requests are in flight."""
    ready: dict[int, str] = {}
    nxt = 0
    for i, text in _generate_indexed(items, generation_order(items, window), gen, concurrency):
        ready[i] = text
        while nxt in ready:
            yield items[nxt], ready.pop(nxt)
            nxt += 1


def _generate_indexed(items: list[Item], order: list[int], gen: Generator, concurrency: int):
    if concurrency <= 1:
        for i in order:
            yield i, gen(items[i])
        return
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    source = iter(order)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        try:
            for i in islice(source, 2 * concurrency):
                pending.append((i, pool.submit(gen, items[i])))
            while pending:
                i, fut = pending.popleft()
                text = fut.result()
                j = next(source, None)
                if j is not None:
                    pending.append((j, pool.submit(gen, items[j])))
                yield i, text
        finally:
            for _, fut in pending:
                fut.cancel()


def describe(summary: dict) -> str:
    s = summary
    state = "complete" if s["complete"] else "INCOMPLETE (run again to resume)"
    return (f"{s['benchmark']}: {s['items']} items, {s['already_answered']} already answered, "
            f"{s['generated']} generated -> {s['answers_file']} [{state}]")


__all__ = ["RunConfig", "run", "describe", "ModelGenerator", "EndpointGenerator", "model_name_from_path"]
