"""``gracevlm export --check ENGINE``: load an export in a peer engine, greedy-decode fixed prompts (text only
and with an image) and compare the tokens with gracevlm on the source checkpoint.

Engines: ``transformers`` (llava-hf, compressed-tensors; always available here), ``llama_cpp`` (gguf; needs
llama-cpp-python, run in a subprocess: ``export.llama_cpp_probe``), ``vllm`` (compressed-tensors, llava-hf; an
OpenAI server already serving the export at ``vllm_url``: vLLM's ``return_tokens_as_token_ids``). A peer that
is not installed or not reachable is reported as skipped, not as a failure.

Two measures per case. *Greedy*: the peer's own greedy tokens against gracevlm's (``agree`` = positions with
the same token, ``prefix`` = tokens before the first difference) - what a user sees. *Teacher-forced*
(transformers, llama.cpp): the peer is fed gracevlm's tokens and its argmax is compared at every step, so one
early near-tie does not hide the rest; each disagreement comes with gracevlm's logit margin there (top token
minus runner-up) and the peer's gap (its top logit minus gracevlm's token's), which show whether it is a
near-tie inside the peer's numeric error (llama.cpp quantizes activations to Q8_0) or a real difference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError

ENGINES = ("transformers", "llama_cpp", "vllm")
ENGINE_FORMATS = {"transformers": ("llava-hf", "qwen3-vl-hf", "compressed-tensors"), "llama_cpp": ("gguf",),
                  "vllm": ("compressed-tensors", "llava-hf", "qwen3-vl-hf")}
PROBE_QUERY = "What is shown in this image?"
PROBE_TEXT = "Hello there, how are you?"
PROBE_TOKENS = 24


def probe_image():
    """The fixed check image: 64 x 40 seeded noise (not square, so padding to a square is exercised)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8))


@dataclass
class CaseResult:
    case: str                       # "text" or "image"
    reference: list[int]            # gracevlm's greedy tokens (EOS excluded)
    greedy: list[int]               # the peer's
    forced_argmax: list[int] | None = None
    margins: list[float] | None = None   # gracevlm: logit(its token) - runner-up, per step
    gaps: list[float] | None = None      # peer: logit(its argmax) - logit(gracevlm's token), per step
    logit_error: list[float] | None = None  # per step: max |peer logit - gracevlm logit| over the vocabulary
    tokenizer_agrees: bool | None = None  # the peer's prompt ids = gracevlm's (llama.cpp: text; vLLM: chat path)
    forced: list[int] | None = None       # the teacher-forced targets: gracevlm's tokens + EOS when it stopped
    feature_error: float | None = None    # llama.cpp: relative L2 of its image embeddings against gracevlm's

    @property
    def agree(self) -> int:
        return sum(a == b for a, b in zip(self.reference, self.greedy))

    @property
    def prefix(self) -> int:
        n = 0
        for a, b in zip(self.reference, self.greedy):
            if a != b:
                break
            n += 1
        return n

    @property
    def forced_agree(self) -> int | None:
        if self.forced_argmax is None:
            return None
        return sum(a == b for a, b in zip(self.forced_targets, self.forced_argmax))

    @property
    def forced_targets(self) -> list[int]:
        return (self.forced or self.reference)[: len(self.forced_argmax or [])]

    def disagreements(self) -> list[dict]:
        """Teacher-forced steps where the peer's argmax differs, with gracevlm's margin and the peer's gap."""
        if self.forced_argmax is None:
            return []
        err = self.logit_error or [float("nan")] * len(self.forced_argmax)
        return [{"step": i, "gracevlm": t, "peer": p, "gracevlm_margin": self.margins[i], "peer_gap": self.gaps[i],
                 "logit_error": err[i]}
                for i, (t, p) in enumerate(zip(self.forced_targets, self.forced_argmax)) if t != p]

    def line(self) -> str:
        n = len(self.reference)
        text = f"{self.case}: greedy {self.agree}/{n} tokens agree (first {self.prefix} identical)"
        if self.tokenizer_agrees is not None:
            text += "; prompt ids identical" if self.tokenizer_agrees else "; PROMPT IDS DIFFER"
        if self.forced_argmax is not None:
            text += f"; teacher-forced {self.forced_agree}/{len(self.forced_argmax)}"
            if self.logit_error:
                text += f" (max logit error {max(self.logit_error):.3g})"
            if self.feature_error is not None:
                text += f"; image features rel. L2 {self.feature_error:.3g}"
            for d in self.disagreements():
                text += (f"; step {d['step']}: gracevlm margin {d['gracevlm_margin']:.3g}, "
                         f"peer gap {d['peer_gap']:.3g}, logit error {d['logit_error']:.3g}")
        return text

    def as_dict(self) -> dict:
        return {**asdict(self), "agree": self.agree, "prefix": self.prefix, "forced_agree": self.forced_agree,
                "disagreements": self.disagreements()}


@dataclass
class CheckResult:
    engine: str
    folder: str
    status: str = "ok"              # "ok" or "skipped"
    reason: str = ""
    cases: list[CaseResult] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.status != "ok":
            return [f"{self.engine}: skipped ({self.reason})"]
        return [f"{self.engine}: {c.line()}" for c in self.cases]

    def as_dict(self) -> dict:
        return {"engine": self.engine, "folder": self.folder, "status": self.status, "reason": self.reason,
                "cases": [c.as_dict() for c in self.cases]}


# -- gracevlm's side ------------------------------------------------------------------------------------

@dataclass
class Reference:
    case: str
    prompt_ids: list[int]           # with one -200 per image
    tokens: list[int]
    forced: list[int]               # tokens + EOS when gracevlm stopped
    margins: list[float]
    logits: object                  # float32 numpy [len(forced), tokenizer vocabulary], teacher-forced
    prompt: str = ""
    query: str = ""
    image: object = None            # PIL image or None
    eos: int = 2
    features: object = None         # gracevlm's image features (float32 numpy [tokens, hidden]) or None


def _forced_logits(vlm, prompt_ids: list[int], forced: list[int], feats):
    import torch

    model = vlm.model
    with torch.inference_mode():  # the forced tokens follow the prompt as text (the model contract places them)
        prompt = model.prompt_for(list(prompt_ids) + list(forced[:-1]), feats)
        n = prompt.length
        cache = model.new_cache(1, n)
        logits = model.forward_prompt(prompt, cache, 0, 0, n, logits_for="all")[0]
    return logits[n - len(forced):, : vlm.tokenizer.vocab_size].float().numpy()


def _feature_rows(feats):
    """The first image's features as float32 numpy ``[tokens, hidden]`` where the family encodes images to one
    tensor (LLaVA), else None (the llama.cpp feature comparison is LLaVA's)."""
    import torch

    return feats[0].float().numpy() if isinstance(feats, torch.Tensor) else None


def _margins(rows, forced: list[int]) -> list[float]:
    import numpy as np

    out = []
    for row, tok in zip(rows, forced):
        others = np.array(row, copy=True)
        others[tok] = -np.inf
        out.append(float(row[tok] - others.max()))
    return out


def _logit_error(peer_rows, ref: "Reference") -> list[float]:
    import numpy as np

    v = min(np.shape(peer_rows)[1], ref.logits.shape[1])
    return [float(np.abs(np.asarray(a[:v]) - b[:v]).max()) for a, b in zip(peer_rows, ref.logits)]


def gracevlm_references(vlm, image, n: int = PROBE_TOKENS, cases=None) -> list[Reference]:
    """gracevlm's greedy answers and teacher-forced logits; ``cases``: (name, query, PIL image or None), by
    default the text-only probe and the image probe."""
    refs = []
    for case, query, img in cases or (("text", PROBE_TEXT, None), ("image", PROBE_QUERY, image)):
        images = [] if img is None else [img]
        g = vlm.generate(query, images=images, max_new_tokens=n)
        forced = g.token_ids + ([vlm.tokenizer.eos_id] if g.finish_reason == "stop" else [])
        feats = vlm.encode_images(images)[0] if images else None
        logits = _forced_logits(vlm, g.prompt_token_ids, forced, feats)
        refs.append(Reference(case, g.prompt_token_ids, g.token_ids, forced, _margins(logits, forced), logits,
                              g.prompt, query, img, vlm.tokenizer.eos_id,
                              _feature_rows(feats)))
    return refs


def _messages(ref: Reference, image_part: dict) -> list[dict]:
    if ref.image is None:
        return [{"role": "user", "content": ref.query}]
    return [{"role": "user", "content": [image_part, {"type": "text", "text": ref.query}]}]


# -- peers ----------------------------------------------------------------------------------------------

def check_transformers(folder: Path, refs: list[Reference], n: int) -> list[CaseResult]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(folder, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.config.text_config.eos_token_id
    out = []
    for ref in refs:
        text = proc.apply_chat_template(_messages(ref, {"type": "image"}), add_generation_prompt=True)
        inputs = proc(images=None if ref.image is None else [ref.image], text=text, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
            greedy = gen[: gen.index(eos)] if eos in gen else gen
            ids = torch.cat([inputs["input_ids"], torch.tensor([ref.forced[:-1]], dtype=torch.long)], 1)
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
        rows = logits[inputs["input_ids"].shape[1] - 1:].float()
        argmax = rows.argmax(-1).tolist()
        gaps = [float(r.max() - r[t]) for r, t in zip(rows, ref.forced)]
        out.append(CaseResult(ref.case, ref.tokens, greedy, argmax, ref.margins, gaps, _logit_error(rows, ref),
                              forced=ref.forced))
    return out


def check_family_peer(peer, refs: list[Reference], n: int) -> list[CaseResult]:
    """A family's transformers peer (``Family.transformers_check``): its greedy tokens and teacher-forced rows,
    compared over gracevlm's vocabulary (rows past the tokenizer are padding gracevlm never samples)."""
    out = []
    for ref in refs:
        greedy, rows = peer.run(ref.query, ref.image, ref.forced, n)
        rows = rows[:, : ref.logits.shape[1]]
        gaps = [float(r.max() - r[t]) for r, t in zip(rows, ref.forced)]
        out.append(CaseResult(ref.case, ref.tokens, greedy, rows.argmax(-1).tolist(), ref.margins, gaps,
                              _logit_error(rows.numpy(), ref)))
    return out


def check_llama_cpp(folder: Path, refs: list[Reference], n: int, timeout: float = 600,
                    embeddings_dir: Path | None = None) -> list[CaseResult]:
    """``embeddings_dir``: also save llama.cpp's image embeddings there, as ``<case>.npy``."""
    model = next((p for p in (folder / "ggml-model-q4_0.gguf", folder / "ggml-model-f16.gguf") if p.is_file()), None)
    mmproj = folder / "mmproj-model-f16.gguf"
    if model is None:
        raise InputError(f"{folder} holds no ggml-model-q4_0.gguf / ggml-model-f16.gguf")
    out = []
    with tempfile.TemporaryDirectory(prefix="gracevlm-check-") as tmp:
        for i, ref in enumerate(refs):
            k = len(ref.prompt_ids) if ref.image is None else ref.prompt_ids.index(-200)
            if ref.image is not None and not mmproj.is_file():
                continue
            image_file = Path(tmp) / f"image-{i}.png"
            if ref.image is not None:
                ref.image.save(image_file)
            spec = {"model": str(model), "mmproj": "" if ref.image is None else str(mmproj),
                    "before": ref.prompt_ids[:k], "after": ref.prompt_ids[k + 1:], "image": str(image_file),
                    "n": n, "forced": ref.forced, "probe_text": ref.prompt,
                    "logits_out": str(Path(tmp) / f"case-{i}.npy"), "embd_out": str(Path(tmp) / f"embd-{i}.npy")}
            spec_file = Path(tmp) / f"case-{i}.json"
            spec_file.write_text(json.dumps(spec))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parents[2]),
                                                                            os.environ.get("PYTHONPATH", "")] if p)}
            p = subprocess.run([sys.executable, "-m", "gracevlm.export.llama_cpp_probe", str(spec_file)],
                               capture_output=True, text=True, timeout=timeout, env=env)
            if p.returncode != 0:
                why = f"signal {-p.returncode}" if p.returncode < 0 else p.stderr.strip().splitlines()[-1:]
                raise RuntimeError(f"llama.cpp failed on the {ref.case} probe: {why}")
            got = json.loads(p.stdout.strip().splitlines()[-1])
            import numpy as np

            peer = np.load(spec["logits_out"])
            feature_error = None
            if ref.image is not None and ref.features is not None:
                embd = np.load(spec["embd_out"])
                if embeddings_dir is not None:
                    np.save(Path(embeddings_dir) / f"{ref.case}.npy", embd)
                feature_error = float(np.linalg.norm(embd - ref.features) / np.linalg.norm(ref.features)) \
                    if embd.shape == ref.features.shape else float("inf")
            out.append(CaseResult(ref.case, ref.tokens, got["greedy"], got["forced_argmax"], ref.margins,
                                  got["forced_gap"], _logit_error(peer, ref),
                                  got["tokenize"] == ref.prompt_ids if ref.image is None else None, ref.forced,
                                  feature_error))
    return out


def _collapse_images(ids: list[int], image_id: int) -> list[int]:
    """Prompt ids with each run of ``image_id`` (a peer's expanded image) replaced by one -200 marker."""
    out: list[int] = []
    for t in ids:
        if t == image_id:
            if not out or out[-1] != -200:
                out.append(-200)
        else:
            out.append(t)
    return out


def check_vllm(url: str, refs: list[Reference], n: int, image_id: int | None = None,
               timeout: float = 300) -> list[CaseResult]:
    """Greedy chat completions (``temperature`` 0, the image as a data-URL ``image_url`` part) with vLLM's
    ``return_token_ids``: the generated ids and the prompt ids vLLM built from the chat template. With
    ``image_id`` (the export's ``image_token_index``) those prompt ids, each image's run of ``image_id``
    collapsed to one marker, are compared with gracevlm's (``tokenizer_agrees``: BOS once, same text ids)."""
    import base64
    import io
    import urllib.request

    def call(path, body=None):
        req = urllib.request.Request(url.rstrip("/") + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    model = call("/v1/models")["data"][0]["id"]
    out = []
    for ref in refs:
        part = None
        if ref.image is not None:
            buf = io.BytesIO()
            ref.image.save(buf, format="PNG")
            part = {"type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
        body = {"model": model, "messages": _messages(ref, part), "max_tokens": n, "temperature": 0,
                "return_token_ids": True, "skip_special_tokens": False}
        got = call("/v1/chat/completions", body)
        toks = [int(t) for t in got["choices"][0]["token_ids"]]
        prompt = got.get("prompt_token_ids")
        agrees = None if image_id is None or prompt is None else _collapse_images(prompt, image_id) == ref.prompt_ids
        out.append(CaseResult(ref.case, ref.tokens, toks[: toks.index(ref.eos)] if ref.eos in toks else toks,
                              tokenizer_agrees=agrees))
    return out


def _unavailable(engine: str, vllm_url: str | None) -> str:
    if engine == "llama_cpp":
        try:
            import llama_cpp  # noqa: F401
            import llama_cpp.mtmd_cpp  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - missing, or a build without mtmd
            return f"llama-cpp-python with mtmd is not importable: {exc}"
    if engine == "vllm":
        if not vllm_url:
            return "no vLLM server given (--vllm-url URL of `python -m vllm.entrypoints.openai.api_server`)"
        import urllib.request

        try:
            urllib.request.urlopen(vllm_url.rstrip("/") + "/v1/models", timeout=10).read()
        except Exception as exc:  # noqa: BLE001
            return f"{vllm_url} is not reachable: {exc}"
    return ""


def check_export(folder: str | os.PathLike, engine: str, model: str | os.PathLike | None = None,
                 n: int = PROBE_TOKENS, vllm_url: str | None = None) -> CheckResult:
    """Check one export folder with one peer engine against gracevlm on ``model`` (default: the export
    report's source)."""
    import gracevlm

    from . import REPORT_NAME

    folder = Path(folder)
    if engine not in ENGINES:
        raise InputError(f"unknown check engine {engine!r}; choose one of {', '.join(ENGINES)}")
    report_file = folder / REPORT_NAME
    if not report_file.is_file():
        raise InputError(f"{folder} is not a gracevlm export (no {REPORT_NAME})")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    if report["format"] not in ENGINE_FORMATS[engine]:
        raise InputError(f"{engine} does not load {report['format']} exports (it loads "
                         f"{', '.join(ENGINE_FORMATS[engine])})")
    result = CheckResult(engine, str(folder))
    reason = _unavailable(engine, vllm_url)
    if reason:
        result.status, result.reason = "skipped", reason
        return result
    vlm = gracevlm.load(model or report["source"], device="cpu")
    image = probe_image()
    refs = gracevlm_references(vlm, image, n)
    from ..models.registry import get_family

    family = get_family(report.get("family", "llava"))
    peer = family.transformers_check(folder) if engine == "transformers" else None
    if peer is not None:
        result.cases = check_family_peer(peer, refs, n)
    elif engine == "transformers":
        result.cases = check_transformers(folder, refs, n)
    elif engine == "llama_cpp":
        result.cases = check_llama_cpp(folder, refs, n)
    else:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        result.cases = check_vllm(vllm_url, refs, n, image_id=config.get("image_token_index"))
    return result
