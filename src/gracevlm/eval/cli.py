"""``gracevlm eval {run,score,submit,report,merge}``. ``register(subparsers)`` adds the ``eval`` command to a parent
parser; ``main(argv)`` runs it standalone (``python -m gracevlm.eval``)."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

from ..errors import GraceVLMError, InputError
from . import BENCHMARKS, benchmark

SUBMITTABLE = ("vqav2", "gqa", "seed", "mmbench")


# -- run ----------------------------------------------------------------------------------------------------
def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="generate answers (LLaVA answer-file format, resumable)")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCHMARKS:
        mod = benchmark(name)
        b = benches.add_parser(name, help=f"answer the {name} questions")
        b.add_argument("--question-file", required=name != "scienceqa",
                       help={"mmbench": "MMBench TSV (base64 images)",
                             "scienceqa": "llava_test_CQM-A.json (or give --base-dir)"}.get(
                           name, "LLaVA question file (JSONL)"))
        if name != "mmbench":
            b.add_argument("--image-folder", default=None, help="folder the question file's image paths are under")
        b.add_argument("--answers-file", required=True, help="answers JSONL (appended to; a rerun resumes)")
        src = b.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", help="checkpoint folder or Hub id, run in-process")
        src.add_argument("--endpoint", help="OpenAI-compatible server URL (POST /v1/chat/completions)")
        b.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                       help="bearer token for --endpoint (default: $OPENAI_API_KEY)")
        b.add_argument("--served-model", default=None, help="'model' field for --endpoint (default: first of "
                                                            "/v1/models)")
        b.add_argument("--concurrency", type=int, default=1, help="parallel requests (--endpoint only)")
        b.add_argument("--timeout", type=float, default=600.0, help="seconds per endpoint request")
        b.add_argument("--device", default="auto")
        b.add_argument("--backend", default=None, help="INT4 kernel backend (in-process)")
        b.add_argument("--prefix-cache-gib", type=float, default=2.0,
                       help="in-process: GiB of prompt-prefix KV and image features kept between questions "
                            "(0: off); questions about one image are generated together, answers written in order")
        b.add_argument("--conv-mode", default=None, help="conversation template (default: from the checkpoint)")
        b.add_argument("--temperature", type=float, default=0.0)
        b.add_argument("--max-new-tokens", type=int, default=None,
                       help=f"default: the prompt style's ({mod.MAX_NEW_TOKENS} as LLaVA's loader for this "
                            "benchmark; 8 for GRACE's Qwen3-VL letter prompts)")
        b.add_argument("--prompt-style", default="model",
                       help="how questions are asked and answers recorded: 'model' (the loaded model's family: "
                            "llava-1.5 or grace-qwen3-vl; --endpoint runs: llava-1.5), or one of those names")
        b.add_argument("--num-chunks", type=int, default=1)
        b.add_argument("--chunk-idx", type=int, default=0)
        b.add_argument("--limit", type=int, default=None, help="only the first N questions (before chunking)")
        b.add_argument("--no-progress", action="store_true", help="no tqdm bar")
        b.add_argument("--json", action="store_true", help="print the run summary as JSON")
        if name in ("scienceqa", "mmbench"):
            b.add_argument("--single-pred-prompt", action="store_true",
                           help="accepted for LLaVA compatibility; the single-pred prompt is always used")
        if name == "scienceqa":
            b.add_argument("--base-dir", default=None,
                           help="ScienceQA folder with problems.json + pid_splits.json (used without --question-file)")
            b.add_argument("--split", default="test")
        if name == "mmbench":
            b.add_argument("--all-rounds", action="store_true", help="one pass per circular rotation of the options")
            b.add_argument("--lang", default="en", choices=["en", "cn"])
        b.set_defaults(eval_func=cmd_run)


def _items_for(args):
    mod = benchmark(args.bench)
    if args.bench == "mmbench":
        return mod.load_items(args.question_file, all_rounds=getattr(args, "all_rounds", False),
                              lang=getattr(args, "lang", "en"))
    if args.bench == "scienceqa":
        return mod.load_items(args.question_file, getattr(args, "image_folder", None),
                              base_dir=getattr(args, "base_dir", None), split=getattr(args, "split", "test"))
    return mod.load_items(args.question_file, getattr(args, "image_folder", None))


def cmd_run(args) -> int:
    from .runner import RunConfig, describe, run

    options = {}
    for key in ("image_folder", "all_rounds", "lang", "base_dir", "split"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    qfile = args.question_file or (str(Path(args.base_dir) / "problems.json") if getattr(args, "base_dir", None)
                                   else None)
    cfg = RunConfig(benchmark=args.bench, answers_file=args.answers_file, question_file=qfile, model=args.model,
                    endpoint=args.endpoint, api_key=args.api_key, served_model=args.served_model,
                    device=args.device, backend=args.backend, conv_mode=args.conv_mode,
                    temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                    prompt_style=args.prompt_style, num_chunks=args.num_chunks,
                    chunk_idx=args.chunk_idx, limit=args.limit, concurrency=args.concurrency, timeout=args.timeout,
                    progress=not args.no_progress, options=options,
                    prefix_cache_gib=args.prefix_cache_gib)
    summary = run(cfg, _items_for(args))
    print(json.dumps(summary) if args.json else describe(summary))
    return 0 if summary["complete"] else 1


# -- score --------------------------------------------------------------------------------------------------
_SCORE_ARGS = {
    "vqav2": [("--question-file", "LLaVA question jsonl of the split"), ("--result-file", "answers JSONL"),
              ("--annotation-file", "VQA annotations JSON"), ("--vqa-question-file", "VQA questions JSON")],
    "textvqa": [("--annotation-file", "TextVQA_0.5.1_val.json"), ("--result-file", "answers JSONL")],
    "pope": [("--annotation-dir", "folder of coco_pope_<category>.json"),
             ("--question-file", "llava_pope_test.jsonl"), ("--result-file", "answers JSONL")],
    "mme": [("--data-dir", "MME_Benchmark_release_version folder"), ("--question-file", "llava_mme.jsonl"),
            ("--result-file", "answers JSONL")],
    "scienceqa": [("--base-dir", "folder with problems.json and pid_splits.json"), ("--result-file", "answers JSONL")],
    "seed": [("--annotation-file", "SEED-Bench.json"), ("--result-file", "answers JSONL")],
    "gqa": [("--annotation-file", "testdev_balanced_questions.json"), ("--result-file", "answers JSONL")],
    "mmbench": [("--question-file", "MMBench dev TSV (with answers)"), ("--result-file", "answers JSONL")],
}


def _add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="score an answers file exactly as the official script does")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCHMARKS:
        b = benches.add_parser(name, help=f"score {name}")
        for flag, help_ in _SCORE_ARGS[name]:
            b.add_argument(flag, required=True, help=help_)
        if name == "scienceqa":
            b.add_argument("--split", default="test")
            b.add_argument("--output-file", default=None, help="correct/incorrect analysis JSON (as the official)")
            b.add_argument("--output-result", default=None, help="acc/results/outputs JSON (as the official)")
        if name in ("vqav2", "gqa", "mme"):
            b.add_argument("--partial", action="store_true",
                           help="score an incomplete run where the official script would abort (marked in output)")
        if name == "mme":
            b.add_argument("--tool-dir", default=None,
                           help="also write the MME tool's answers/<name>/<subtask>.txt files here")
        b.add_argument("--json", action="store_true", help="print the full result as JSON")
        b.add_argument("--output", default=None,
                       help="score JSON path (default: <result-file stem>.<bench>.score.json beside it)")
        b.add_argument("--no-save", action="store_true", help="do not write the score JSON")
        b.set_defaults(eval_func=cmd_score)


def score_bench(args) -> dict:
    mod = benchmark(args.bench)
    name = args.bench
    if name == "vqav2":
        return mod.score(args.question_file, args.result_file, args.annotation_file, args.vqa_question_file,
                         partial=args.partial)
    if name == "textvqa":
        return mod.score(args.annotation_file, args.result_file)
    if name == "pope":
        return mod.score(args.annotation_dir, args.question_file, args.result_file)
    if name == "mme":
        return mod.score(args.data_dir, args.question_file, args.result_file, partial=args.partial,
                         tool_dir=args.tool_dir)
    if name == "scienceqa":
        return mod.score(args.base_dir, args.result_file, args.split, args.output_file, args.output_result)
    if name == "seed":
        return mod.score(args.annotation_file, args.result_file)
    if name == "gqa":
        return mod.score(args.annotation_file, args.result_file, partial=args.partial)
    return mod.score(args.question_file, args.result_file)


def default_score_path(result_file: str, bench: str) -> Path:
    p = Path(result_file)
    return p.with_name(f"{p.stem}.{bench}.score.json")


def cmd_score(args) -> int:
    from .. import __version__
    from .answers import manifest_path, read_json, write_json_atomic

    res = score_bench(args)
    res["result_file"] = str(args.result_file)
    res["scored_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    res["gracevlm_version"] = __version__
    mpath = manifest_path(args.result_file)
    if mpath.is_file():
        try:
            m = read_json(mpath)
            res["run"] = {k: m.get(k) for k in ("model", "endpoint", "model_id", "conv_mode", "decoding")}
        except InputError:
            pass
    if not args.no_save:
        out = Path(args.output) if args.output else default_score_path(args.result_file, args.bench)
        write_json_atomic(out, res)
        res["score_file"] = str(out)
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
    else:
        print(benchmark(args.bench).format_text(res))
        c = res.get("counts", {})
        print("counts: " + ", ".join(f"{k}={v}" for k, v in c.items()))
        if res.get("score_file"):
            print(f"score JSON: {res['score_file']}")
    return 0


# -- submit -------------------------------------------------------------------------------------------------
def _add_submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="write the file a benchmark's evaluation server expects")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = benches.add_parser("vqav2", help="EvalAI test-dev JSON (every question of the full test file)")
    b.add_argument("--question-file", required=True, help="the FULL test file llava_vqav2_mscoco_test2015.jsonl")
    b.add_argument("--result-file", required=True)
    b.add_argument("--output", required=True, help="e.g. answers_upload/llava_vqav2_mscoco_test-dev2015/NAME.json")
    b = benches.add_parser("gqa", help="testdev_balanced_predictions.json")
    b.add_argument("--result-file", required=True)
    b.add_argument("--output", required=True)
    b = benches.add_parser("seed", help="SEED upload JSONL (requires every question answered)")
    b.add_argument("--annotation-file", required=True)
    b.add_argument("--result-file", required=True)
    b.add_argument("--output", required=True)
    b = benches.add_parser("mmbench", help="OpenCompass xlsx")
    b.add_argument("--question-file", required=True, help="the MMBench TSV the answers were made from")
    b.add_argument("--result-file", required=True)
    b.add_argument("--output", required=True, help="NAME.xlsx")
    for b in benches.choices.values():
        b.add_argument("--json", action="store_true")
        b.set_defaults(eval_func=cmd_submit)


def cmd_submit(args) -> int:
    mod = benchmark(args.bench)
    if args.bench == "vqav2":
        res = mod.submit(args.result_file, args.question_file, args.output)
    elif args.bench == "gqa":
        res = mod.submit(args.result_file, args.output)
    elif args.bench == "seed":
        res = mod.submit(args.annotation_file, args.result_file, args.output)
    else:
        res = mod.submit(args.question_file, args.result_file, args.output)
    print(json.dumps(res) if args.json else f"wrote {res['output']}")
    return 0


# -- report -------------------------------------------------------------------------------------------------
def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="JSON + Markdown + PNG summary of the score JSONs in run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one folder per run (searched recursively for "
                                                                  "*.score.json)")
    p.add_argument("--label", action="append", default=None, help="name of each run (repeat, in order)")
    p.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(eval_func=cmd_report)


def cmd_report(args) -> int:
    from .report import to_markdown, write_report

    rep = write_report(args.run_dirs, args.out, args.label, chart=not args.no_chart)
    print(json.dumps(rep) if args.json else to_markdown(rep) + "\n" + "files: " +
          ", ".join(rep["files"].values()))
    return 0


# -- merge --------------------------------------------------------------------------------------------------
def _add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="join chunk answer files in index order, checking duplicates and gaps")
    p.add_argument("bench", choices=BENCHMARKS, metavar="BENCH")
    p.add_argument("--question-file", default=None, help="the question file the chunks were made from")
    p.add_argument("--base-dir", default=None, help="scienceqa without --question-file")
    p.add_argument("--split", default="test")
    p.add_argument("--all-rounds", action="store_true", help="mmbench runs made with --all-rounds")
    p.add_argument("--limit", type=int, default=None, help="the --limit the chunks were run with")
    p.add_argument("--chunks-dir", default=None, help="folder with {K}_{i}.jsonl chunk files")
    p.add_argument("--num-chunks", type=int, default=None)
    p.add_argument("--inputs", nargs="+", default=None, help="chunk files in order (instead of --chunks-dir)")
    p.add_argument("--output", required=True, help="merged answers file (e.g. merge.jsonl)")
    p.add_argument("--force", action="store_true", help="write even with duplicates/gaps/unknown ids")
    p.add_argument("--json", action="store_true")
    p.set_defaults(eval_func=cmd_merge)


def cmd_merge(args) -> int:
    from .answers import chunk_file_names, merge_files, occurrence_keys

    if args.inputs:
        inputs = args.inputs
    elif args.chunks_dir and args.num_chunks:
        inputs = chunk_file_names(args.chunks_dir, args.num_chunks)
    else:
        raise InputError("give --inputs FILE... or --chunks-dir DIR --num-chunks K")
    expected = None
    if args.question_file or args.base_dir:
        args.image_folder = None
        args.lang = "en"
        questions = _items_for(args)
        if args.limit is not None:
            questions = questions[:args.limit]
        expected = occurrence_keys(it.question_id for q in questions for it in q)
    rep = merge_files(inputs, args.output, expected, force=args.force)
    print(json.dumps(rep) if args.json else
          f"merged {rep['written']} answers from {len(rep['inputs'])} files into {rep['output']}"
          + (f" (problems: {', '.join(rep['problems'])})" if rep["problems"] else ""))
    return 0


# -- entry points -------------------------------------------------------------------------------------------
def _populate(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{run,score,submit,report,merge}")
    _add_run_parser(sub)
    _add_score_parser(sub)
    _add_submit_parser(sub)
    _add_report_parser(sub)
    _add_merge_parser(sub)
    p.set_defaults(func=dispatch)


_DESCRIPTION = ("Evaluate on VQAv2, GQA, TextVQA, POPE, MME, ScienceQA, SEED and MMBench with LLaVA-1.5's prompts "
                "and the official scorers' rules.")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with run/score/submit/report/merge) to a parent parser's subparsers; the parsed namespace's
    ``func`` runs it and returns the exit code."""
    p = subparsers.add_parser("eval", help="benchmarks: run, score, submit, report, merge (LLaVA-1.5 protocol)",
                              description=_DESCRIPTION)
    _populate(p)
    return p


def dispatch(args) -> int:
    return args.eval_func(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gracevlm.eval", description=_DESCRIPTION)
    _populate(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m gracevlm.eval run pope ...`` (a leading ``eval`` is accepted too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GraceVLMError as exc:
        print(f"gracevlm eval: error: {exc}", file=sys.stderr)
        return 2
