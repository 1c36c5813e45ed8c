"""``gracevlm demo``: the bundled GRACE W4 demo model.

    gracevlm demo [run]             draw a held-out picture, save it, ask three questions, show the references
    gracevlm demo evaluate --json   exact-match accuracy on the held-out split (generated live; --views: sizes)
    gracevlm demo compare           teacher / RTN / QAT-only / GRACE at W4G128 and W3G128 (needs a build's work)
    gracevlm demo table             the README's demo table from results.json
    gracevlm demo build             the whole recipe (world, tokenizer, teacher, students, packing)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluate import DEFAULT_HELDOUT


def _view(text: str | None) -> tuple[int, int] | None:
    from .evaluate import parse_view

    return None if text is None else parse_view(text)


def cmd_run(args) -> int:
    """One picture, three questions of different kinds (or ``--query``), answers next to the references."""
    import random

    from ..engine.vlm import load
    from .evaluate import MODEL_DIR
    from .world import QUADRANTS, draw_scene, generate_split, showcase

    model = Path(args.model or MODEL_DIR)
    if not (model / "config.json").is_file():
        print(f"gracevlm demo: no model in {model}; build it with `python -m gracevlm.demo build`", file=sys.stderr)
        return 2
    try:
        width, height = _view(args.size) or (256, 256)
    except ValueError as exc:
        print(f"gracevlm demo: error: {exc}", file=sys.stderr)
        return 2
    if args.index is not None and args.index < 0:
        print(f"gracevlm demo: error: --index must be >= 0, got {args.index}", file=sys.stderr)
        return 2
    vlm = load(model, device="cpu")
    if args.index is None:  # the first held-out picture with three objects: something to talk about
        pairs = generate_split("heldout", 50, args.seed)
        index = next((i for i, (_, sc) in enumerate(pairs) if len(sc.objects) == 3), 0)
    else:
        index = args.index
    _, scene = generate_split("heldout", index + 1, args.seed)[index]
    image = draw_scene(scene, width, height)
    saved = None
    if args.save_image != "":
        saved = Path(args.save_image or "gracevlm-demo.png").resolve()
        image.save(saved)
    if args.query:
        turns = [(args.query, None, None)]
    else:
        turns = [(qa.question, qa.answer, qa.kind) for qa in showcase(scene, random.Random(args.seed * 7 + index))]
    objects = [f"{o.size} {o.color} {o.shape} ({QUADRANTS[o.quadrant]})" for o in scene.objects]
    results = []
    for query, reference, kind in turns:
        out = vlm.generate(query, images=[image], max_new_tokens=args.max_new_tokens, temperature=0.0)
        item = {"query": query, "answer": out.text.strip()}
        if reference is not None:
            item.update(reference=reference, kind=kind, correct=item["answer"] == reference)
        results.append(item)
    if args.json:
        print(json.dumps({"image": str(saved) if saved else None, "size": [width, height], "objects": objects,
                          "turns": results, **results[0]}))
        return 0
    print(f"picture ({width} x {height} px): {', '.join(objects)}")
    if saved:
        print(f"saved to {saved} (open it to check the answers yourself)")
    for item in results:
        print(f"\nUSER: {item['query']}\nASSISTANT: {item['answer']}")
        if "reference" in item:
            mark = "correct" if item["correct"] else "WRONG"
            print(f"  (reference answer: {item['reference']}; {mark})")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import MODEL_DIR, VIEWS, evaluate, evaluate_views

    try:
        view = _view(args.size)
    except ValueError as exc:
        print(f"gracevlm demo: error: {exc}", file=sys.stderr)
        return 2
    model = args.model or MODEL_DIR
    if not (Path(model) / "config.json").is_file():
        print(f"gracevlm demo: no model in {model}; build it with `python -m gracevlm.demo build`", file=sys.stderr)
        return 2
    if args.views:
        res = evaluate_views(model, VIEWS, n=args.n, seed=args.seed, quantize=args.quantize)
        if args.json:
            print(json.dumps({v: {k: r[k] for k in ("accuracy", "ci95", "n", "by_type")} for v, r in res.items()}))
        else:
            for v, r in res.items():
                worst = min(r["by_type"].items(), key=lambda kv: kv[1])
                print(f"{v:>8}: {r['accuracy']:6.2f}% [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] of {r['n']}"
                      f"  (weakest type: {worst[0]} {worst[1]:.1f}%)")
        return 0
    res = evaluate(model, n=args.n, seed=args.seed, quantize=args.quantize, view=view,
                   progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({k: res[k] for k in ("accuracy", "ci95", "n", "by_type", "view")}))
    else:
        print(f"exact-match accuracy {res['accuracy']:.2f}% (95% CI {res['ci95'][0]:.1f}-{res['ci95'][1]:.1f}) on "
              f"{res['n']} held-out questions, pictures {res['view'][0]} x {res['view'][1]} ({res['seconds']:.1f}s)")
        for kind, acc in res["by_type"].items():
            print(f"  {kind:<12} {acc:5.1f}%")
    return 0


def cmd_compare(args) -> int:
    from .recipe import compare

    res = compare(args.work, n=args.n, seed=args.seed, packed=args.packed)
    if args.json:
        print(json.dumps({k: {"accuracy": v["accuracy"], "ci95": v["ci95"], "n": v["n"]} for k, v in res.items()}))
    else:
        for name, r in res.items():
            print(f"{name:<14} {r['accuracy']:6.2f}%  95% CI [{r['ci95'][0]:5.1f}, {r['ci95'][1]:5.1f}]  "
                  f"(n={r['n']}, {r['path']})")
    return 0


def cmd_table(args) -> int:
    from .recipe import RESULTS_FILE, results_table

    path = Path(args.results or RESULTS_FILE)
    if not path.is_file():
        print(f"gracevlm demo: error: {path} not found (written by `python -m gracevlm.demo build`)", file=sys.stderr)
        return 2
    print(results_table(json.loads(path.read_text())))
    return 0


def cmd_build(args) -> int:
    from .recipe import RecipeConfig, build

    cfg = RecipeConfig(work=args.work, seed=args.seed, threads=args.threads, evaluate=not args.no_evaluate,
                       progress=not args.no_progress)
    if args.out:
        cfg.out = args.out
    if args.fast:  # a quick smoke run of the whole pipeline (the model will be weak)
        cfg.n_train, cfg.n_heldout, cfg.n_views, cfg.teacher_steps, cfg.student_steps = 400, 50, 50, 40, 20
        cfg.vision_steps, cfg.vision_batch = 20, 16
        cfg.projector_steps, cfg.projector_batch = 20, 16
    if args.fixed_size:
        cfg.varied_sizes = False
    for name in ("vision_steps", "projector_steps", "teacher_steps", "student_steps", "n_views"):
        if getattr(args, name) is not None:
            least = 0 if name == "projector_steps" else 1
            if getattr(args, name) < least:
                print(f"gracevlm demo: error: --{name.replace('_', '-')} must be >= {least}", file=sys.stderr)
                return 2
            setattr(cfg, name, getattr(args, name))
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
        q.add_argument("--index", type=int, default=None,
                       help="which held-out picture (default: the first with three objects)")
        q.add_argument("--query", default=None, help="your own question (default: the held-out one)")
        q.add_argument("--save-image", default=None,
                       help="where to save the picture (default ./gracevlm-demo.png; '' to not save it)")
        q.add_argument("--size", default=None, help="picture size N or WxH in pixels (default 256)")
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
    q.add_argument("--size", default=None, help="draw the pictures at N or WxH pixels (default: the tower's size)")
    q.add_argument("--views", action="store_true", help="every robustness view (sizes 64-256, non-square)")
    q.add_argument("--json", action="store_true",
                   help='print {"accuracy": percent, "ci95": [lo, hi], "n": questions, "by_type": {...}}')
    q.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("compare", help="teacher, RTN W4G128, QAT-only W4 and GRACE W4 on the held-out split")
    q.add_argument("--work", default="out/demo-work", help="the build's work folder")
    q.add_argument("--packed", default=None, help="GRACE student folder (default: WORK/grace/awq)")
    q.add_argument("--n", type=int, default=DEFAULT_HELDOUT)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_compare)

    q = sub.add_parser("table", help="the README's demo table (Markdown) from results.json")
    q.add_argument("--results", default=None, help="results file (default: the one shipped with the model)")
    q.set_defaults(func=cmd_table)

    q = sub.add_parser("build", help="run the recipe that produces the bundled model")
    q.add_argument("--work", default="out/demo-work")
    q.add_argument("--out", default=None, help="where to put the packed student (default: the package's model/)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    q.add_argument("--force", action="store_true", help="redo every stage")
    q.add_argument("--fast", action="store_true", help="tiny smoke run of the pipeline")
    q.add_argument("--vision-steps", type=int, default=None, help="override the recipe's vision-tower steps")
    q.add_argument("--projector-steps", type=int, default=None,
                   help="override the recipe's projector steps (0: no projector stage; the teacher trains it)")
    q.add_argument("--teacher-steps", type=int, default=None, help="override the recipe's teacher steps")
    q.add_argument("--student-steps", type=int, default=None, help="override the recipe's steps per student")
    q.add_argument("--n-views", type=int, default=None, help="held-out questions per robustness view (400)")
    q.add_argument("--fixed-size", action="store_true",
                   help="train on 64 px pictures only (the recipe trains on 64-256 px, square, 4:3 and 3:4)")
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
