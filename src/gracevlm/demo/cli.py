"""``gracevlm demo``: the bundled GRACE W4 demo model.

    gracevlm demo [run]             answer a held-out question about a freshly drawn picture
    gracevlm demo evaluate --json   exact-match accuracy on the held-out split (generated live)
    gracevlm demo compare           teacher / RTN W4G128 / QAT-only W4 / GRACE W4 (needs a build's work folder)
    gracevlm demo build             the whole recipe (world, tokenizer, teacher, students, packing)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluate import DEFAULT_HELDOUT


def cmd_run(args) -> int:
    from ..engine.vlm import load
    from .evaluate import MODEL_DIR
    from .world import draw_scene, generate_split

    model = Path(args.model or MODEL_DIR)
    if not (model / "config.json").is_file():
        print(f"gracevlm demo: no model in {model}; build it with `python -m gracevlm.demo build`", file=sys.stderr)
        return 2
    vlm = load(model, device="cpu")
    record, scene = generate_split("heldout", args.index + 1, args.seed)[args.index]
    image = draw_scene(scene, vlm.model.vision_tower.config.image_size)
    query = args.query or record["conversations"][0]["value"].replace("<image>\n", "")
    out = vlm.generate(query, images=[image], max_new_tokens=args.max_new_tokens, temperature=0.0)
    if args.save_image:
        draw_scene(scene, 256).save(args.save_image)
    result = {"query": query, "answer": out.text.strip(), "objects": [
        f"{o.size} {o.color} {o.shape} ({['top left', 'top right', 'bottom left', 'bottom right'][o.quadrant]})"
        for o in scene.objects]}
    if not args.query:
        result["reference"] = record["conversations"][1]["value"]
    if args.json:
        print(json.dumps(result))
    else:
        saved = f" (saved to {args.save_image})" if args.save_image else ""
        print(f"picture: {', '.join(result['objects'])}{saved}")
        print(f"USER: {query}\nASSISTANT: {result['answer']}")
        if "reference" in result:
            print(f"(reference answer: {result['reference']})")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import MODEL_DIR, evaluate

    res = evaluate(args.model or MODEL_DIR, n=args.n, seed=args.seed, quantize=args.quantize,
                   progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({"accuracy": res["accuracy"], "n": res["n"]}))
    else:
        print(f"exact-match accuracy {res['accuracy']:.2f}% on {res['n']} held-out questions ({res['seconds']:.1f}s)")
        for kind, acc in res["by_type"].items():
            print(f"  {kind:<12} {acc:5.1f}%")
    return 0


def cmd_compare(args) -> int:
    from .recipe import compare

    res = compare(args.work, n=args.n, seed=args.seed, packed=args.packed)
    if args.json:
        print(json.dumps({k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in res.items()}))
    else:
        for name, r in res.items():
            print(f"{name:<14} {r['accuracy']:6.2f}%  (n={r['n']}, {r['path']})")
    return 0


def cmd_build(args) -> int:
    from .recipe import RecipeConfig, build

    cfg = RecipeConfig(work=args.work, seed=args.seed, threads=args.threads, evaluate=not args.no_evaluate,
                       progress=not args.no_progress)
    if args.out:
        cfg.out = args.out
    if args.fast:  # a quick smoke run of the whole pipeline (the model will be weak)
        cfg.n_train, cfg.n_heldout, cfg.teacher_steps, cfg.student_steps = 400, 50, 40, 20
    res = build(cfg, force=args.force)
    print(json.dumps({k: res[k] for k in ("accuracy", "sizes_bytes", "times") if k in res}, indent=1))
    return 0


def add_demo_parser(subparsers, prog: str | None = None) -> argparse.ArgumentParser:
    extra = {"prog": prog} if prog else {}
    p = subparsers.add_parser("demo", help="the bundled GRACE W4 demo model: run | evaluate | compare | build",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, **extra)
    sub = p.add_subparsers(dest="demo_command")

    def run_args(q):
        q.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--index", type=int, default=0, help="which held-out picture")
        q.add_argument("--query", default=None, help="your own question (default: the held-out one)")
        q.add_argument("--save-image", default=None, help="also save the picture (256 px) to this file")
        q.add_argument("--max-new-tokens", type=int, default=16)
        q.add_argument("--json", action="store_true")

    run_args(p)
    p.set_defaults(func=cmd_run)
    run_args(sub.add_parser("run", help="answer one held-out question"))
    sub.choices["run"].set_defaults(func=cmd_run)

    q = sub.add_parser("evaluate", help="exact-match accuracy on the held-out split")
    q.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    q.add_argument("--n", type=int, default=DEFAULT_HELDOUT, help=f"questions (default {DEFAULT_HELDOUT})")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quantize", choices=["rtn"], default=None, help="RTN W4G128 at load (for fp16 checkpoints)")
    q.add_argument("--json", action="store_true", help='print {"accuracy": percent, "n": questions}')
    q.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("compare", help="teacher, RTN W4G128, QAT-only W4 and GRACE W4 on the held-out split")
    q.add_argument("--work", default="out/demo-work", help="the build's work folder")
    q.add_argument("--packed", default=None, help="GRACE student folder (default: WORK/grace/awq)")
    q.add_argument("--n", type=int, default=DEFAULT_HELDOUT)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_compare)

    q = sub.add_parser("build", help="run the recipe that produces the bundled model")
    q.add_argument("--work", default="out/demo-work")
    q.add_argument("--out", default=None, help="where to put the packed student (default: the package's model/)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    q.add_argument("--force", action="store_true", help="redo every stage")
    q.add_argument("--fast", action="store_true", help="tiny smoke run of the pipeline")
    q.add_argument("--no-evaluate", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_build)
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` (with run / evaluate / compare / build) to the ``gracevlm`` sub-command parsers."""
    return add_demo_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m gracevlm.demo ...`` (the same sub-commands as ``gracevlm demo``)."""
    from ..errors import GraceVLMError

    parser = argparse.ArgumentParser(prog="python -m gracevlm.demo")
    sub = parser.add_subparsers(dest="command")
    add_demo_parser(sub, prog="python -m gracevlm.demo")
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except GraceVLMError as exc:
        print(f"gracevlm demo: error: {exc}", file=sys.stderr)
        return 2
