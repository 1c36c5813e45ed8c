"""Token agreement of the exports with gracevlm in the peer engines, on the tiny synthesized model and on the
bundled demo model (its first 12 held-out questions), the README's per-engine tables.

    PYTHONPATH=src python benchmarks/peer_agreement.py [--out /tmp/peer-agreement] [--engines transformers llama_cpp]

For each model: export compressed-tensors and gguf, then per engine (``gracevlm.export.check``): the tiny
model's text-only and image probes (24 greedy tokens) and the demo's 12 held-out questions (answers until EOS,
at most 24 tokens; an answer agrees when every token does). llama_cpp needs llama-cpp-python.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import gracevlm
from gracevlm.demo.world import draw_scene, generate_split
from gracevlm.export import export_model
from gracevlm.export.check import check_llama_cpp, check_transformers, gracevlm_references, probe_image
from gracevlm.synth.checkpoint import synthesize

DEMO = Path(gracevlm.__file__).parent / "demo" / "model"
FOLDERS = {"transformers": "compressed-tensors", "llama_cpp": "gguf"}
RUN = {"transformers": check_transformers, "llama_cpp": check_llama_cpp}


def demo_cases(n: int = 12):
    cases = []
    for record, scene in generate_split("heldout", n):
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        cases.append((record["id"], question, draw_scene(scene)))
    return cases


def measure(model: Path, out: Path, engines: list[str], cases=None, n: int = 24) -> dict:
    vlm = gracevlm.load(model, device="cpu")
    refs = gracevlm_references(vlm, probe_image(), n, cases)
    results = {}
    for engine in engines:
        folder = out / FOLDERS[engine]
        if not folder.exists():
            export_model(model, FOLDERS[engine], folder)
        cases_out = RUN[engine](folder, refs, n)
        results[engine] = [c.as_dict() | {"line": c.line()} for c in cases_out]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/peer-agreement")
    ap.add_argument("--engines", nargs="+", default=["transformers", "llama_cpp"], choices=sorted(RUN))
    args = ap.parse_args()
    out = Path(args.out)
    tiny = out / "tiny-awq"
    if not tiny.exists():
        synthesize(tiny, "tiny", "awq", seed=7, progress=False)
    report = {"tiny": measure(tiny, out / "tiny", args.engines),
              "demo": measure(DEMO, out / "demo", args.engines, demo_cases())}
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
    (out / "peer_agreement.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
