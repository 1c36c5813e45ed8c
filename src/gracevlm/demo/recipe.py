"""The demo-model recipe: synthetic VQA world -> tokenizer -> vision tower pretrained on the world's ground truth
(``vision_pretrain``) -> projector pretrained to keep each patch's quadrant and object (``projector_pretrain``)
-> teacher (LM, projector at a tenth of its rate; tower frozen) -> GRACE W4G128
student (LSQ + GDKD + RCKA + IB) -> packed GRACE AWQ release folder, plus the baselines it is compared
with (QAT-only W4 student, RTN W4G128 of the teacher) and the same three at a harder setting, W3G128
(3-bit codes -4..3, stored in the same 4-bit AWQ container, so every model loads through ``gracevlm.load``).

Every stage writes into ``work/<stage>`` and is skipped when its output is already complete, so an
interrupted build continues where it stopped (``force=True`` redoes everything). The run is
deterministic for a given seed and thread count.

    python -m gracevlm.demo build --work out/demo-work --out src/gracevlm/demo/model
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .evaluate import MODEL_DIR
from .model_def import DemoArch, build_model

RESULTS_FILE = Path(__file__).resolve().parent / "results.json"


@dataclass
class RecipeConfig:
    work: str = "out/demo-work"
    out: str = str(MODEL_DIR)
    seed: int = 0
    n_train: int = 24000
    n_heldout: int = 400
    n_views: int = 400  # held-out questions per robustness view
    questions_per_image: int = 8  # short answers per training picture: more supervised tokens per image forward
    train_describe: bool = False  # no description turn: it costs tokens and did not speed up learning
    varied_sizes: bool = True  # training pictures at 64-256 px, square and 4:3 / 3:4 (world.train_view)
    # two layers of four heads (and eight questions per picture) learned the world's look-ups (find an object by
    # one attribute, read another) faster in our runs than four layers of two: 70% vs 61% after 1,000 steps
    arch: DemoArch = field(default_factory=lambda: DemoArch(hidden=128, intermediate=384, layers=2, heads=4,
                                                            patch_size=16, vision_intermediate=256,
                                                            vision_layers=4))
    tokenizer_vocab: int = 512
    tokenizer_lines: int = 2000
    vision_steps: int = 3000  # the tower's own stage: per-quadrant shape / colour / size from the ground truth
    vision_batch: int = 64
    vision_lr: float = 2e-3
    # > 0: every patch row also learns its quadrant's object (vision_pretrain.PatchHead). In a side run the LM then
    # read the picture sooner (71% vs 55% of held-out questions after 500 teacher steps); off in the shipped build
    vision_dense_weight: float = 0.0
    # the projector's own stage (projector_pretrain): its rows learn each patch's quadrant and that quadrant's
    # object on the frozen tower; the teacher then trains it slowly (teacher_projector_lr). In side runs (400
    # held-out questions, fresh pictures) `where` reached 72-81% after 1,000 teacher steps against 21-41% with
    # the projector trained by the answers alone
    projector_steps: int = 1000
    projector_batch: int = 64
    projector_lr: float = 3e-3
    teacher_steps: int = 4000
    teacher_batch: int = 32
    teacher_lr: float = 3e-3  # the tower is frozen and already sees; the projector + LM learn to read it
    teacher_train_vision: bool = False
    # after the projector stage the teacher trains the projector slowly (frozen, in the first build with this stage,
    # left `shape` at 76.9%: the projected rows had lost part of it); teacher_lr when projector_steps is 0
    teacher_projector_lr: float | None = 3e-4
    teacher_warmup_ratio: float = 0.03
    student_steps: int = 150
    student_batch: int = 16
    student_lr: float = 3e-5
    scale_lr: float = 1e-3
    rcka_warmup: int = 50  # the paper's 400 is longer than this short student run
    harder: bool = True  # also RTN / QAT-only / GRACE at W3G128 (where the methods separate)
    threads: int | None = 1  # 1 thread: on a shared 2-core machine 2 threads oversubscribe and run 5-10x slower
    evaluate: bool = True
    progress: bool = True

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.as_dict()
        return d


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def prepare_workspace(cfg: RecipeConfig, force: bool = False) -> dict[str, Path]:
    """Stages 1-3: the data splits, the tokenizer and the randomly initialized model checkpoint."""
    from ..models.tokenizer import train_tokenizer
    from ..train.export import checkpoint_config, save_dense_checkpoint
    from .world import corpus_lines, write_split

    work = Path(cfg.work)
    paths = {"data": work / "data", "tokenizer": work / "tokenizer", "init": work / "init"}
    if force or not (paths["data"] / "heldout.json").is_file():
        _say(f"drawing the world: {cfg.n_train} training images, {cfg.n_heldout} held-out")
        shutil.rmtree(paths["data"], ignore_errors=True)
        write_split(paths["data"], "train", cfg.n_train, cfg.seed, cfg.arch.image_size, cfg.questions_per_image,
                    cfg.varied_sizes, cfg.train_describe)
        write_split(paths["data"], "heldout", cfg.n_heldout, cfg.seed, cfg.arch.image_size)
    if force or not (paths["tokenizer"] / "tokenizer.model").is_file():
        records = json.loads((paths["data"] / "train.json").read_text())[: cfg.tokenizer_lines]
        tok = train_tokenizer(paths["tokenizer"], corpus_lines(records), cfg.tokenizer_vocab)
        if tok.vocab_size > cfg.arch.vocab:
            raise ValueError(f"tokenizer has {tok.vocab_size} pieces, the model only {cfg.arch.vocab} rows")
        _say(f"tokenizer: {tok.vocab_size} pieces")
    if force or not (paths["init"] / "config.json").is_file():
        model = build_model(cfg.arch, seed=cfg.seed)
        config = checkpoint_config(model, max_length=cfg.arch.max_positions)
        save_dense_checkpoint(model, paths["init"], config, paths["tokenizer"], torch.float32, force=True)
    return paths


def _pretrain_stage(name: str, what: str, source: Path, paths: dict[str, Path], work: str, force: bool,
                    run) -> Path:
    """Load the dense checkpoint ``source``, ``run(model, preprocess) -> log`` on it (in place), write
    ``work/<name>/model`` and ``work/<name>/log.json``; skipped when that model is complete (unless ``force``)."""
    from ..models.llava.processing import preprocess_image
    from ..train.export import save_dense_checkpoint
    from ..train.trainer import _load_model

    out = Path(work) / name
    final = out / "model"
    if not force and (final / "config.json").is_file():
        _say(f"{name}: done already ({final})")
        return final
    _say(f"{name}: pretraining {what}")
    loaded, model = _load_model(str(source), "cpu", fuse=False)
    spec = loaded.family.training_format(loaded).image_spec
    log = run(model, lambda img: preprocess_image(img, spec))
    save_dense_checkpoint(model, final, dict(loaded.config.raw), paths["tokenizer"], torch.float32, force=True)
    (out / "log.json").write_text(json.dumps(log, indent=0) + "\n")
    return final


def vision_stage(cfg: RecipeConfig, paths: dict[str, Path], force: bool) -> Path:
    """Stage 4: pretrain the initial checkpoint's CLIP tower on per-quadrant ground truth
    (``vision_pretrain``); writes ``work/vision/model`` (the whole dense checkpoint, head dropped) and
    ``work/vision/log.json`` (losses and the head's final accuracy)."""
    from .vision_pretrain import pretrain_vision

    return _pretrain_stage(
        "vision", f"the tower ({cfg.vision_steps} steps of {cfg.vision_batch} pictures)", paths["init"], paths,
        cfg.work, force, lambda model, pre: pretrain_vision(model, pre, cfg.vision_steps, cfg.vision_batch,
                                                             cfg.vision_lr, cfg.seed, progress=cfg.progress,
                                                             dense_weight=cfg.vision_dense_weight))


def projector_stage(cfg: RecipeConfig, seeing: Path, paths: dict[str, Path], force: bool) -> Path:
    """Stage 5: pretrain the projector of the vision stage's checkpoint ``seeing`` (``projector_pretrain``);
    writes ``work/projector/model`` and ``work/projector/log.json``. ``projector_steps`` 0: ``seeing`` as is."""
    from .projector_pretrain import pretrain_projector

    if cfg.projector_steps <= 0:
        return seeing
    return _pretrain_stage(
        "projector", f"({cfg.projector_steps} steps of {cfg.projector_batch} pictures)", seeing, paths, cfg.work,
        force, lambda model, pre: pretrain_projector(model, pre, cfg.projector_steps, cfg.projector_batch,
                                                      cfg.projector_lr, cfg.seed, progress=cfg.progress))


# The students: stage -> (method, bits). GRACE and QAT-only at W4G128 (the shipped setting) and W3G128.
STUDENTS = {"grace": ("grace", 4), "qat-only": ("qat", 4), "grace-w3": ("grace", 3), "qat-only-w3": ("qat", 3)}


def _train(stage: str, work: Path, force: bool, **kwargs) -> Path:
    from ..train.trainer import TrainConfig, train

    out = work / stage
    final = out / ("model" if kwargs["method"] == "fp" else "awq")
    if not force and (final / "config.json").is_file():
        _say(f"{stage}: done already ({final})")
        return final
    if force:
        shutil.rmtree(out, ignore_errors=True)
    _say(f"{stage}: training ({kwargs['method']}, {kwargs.get('bits', 4)}-bit, {kwargs['steps']} steps)")
    summary = train(TrainConfig(out=str(out), resume="auto", save_every=100, **kwargs))
    if not summary["finished"]:
        raise RuntimeError(f"{stage}: training stopped at step {summary['steps']}")
    return final


def rtn_student(teacher: str | os.PathLike, out: str | os.PathLike, bits: int, group_size: int = 128) -> Path:
    """Round-to-nearest of the teacher's language-model linears at ``bits`` (scale = max|W_group| / qmax,
    codes clamp(round(W / s))), packed into the GRACE AWQ layout by the same export as the students."""
    from ..train.export import export_awq
    from ..train.qat import prepare
    from ..train.trainer import _load_model

    loaded, model = _load_model(str(teacher), "cpu", fuse=False)
    prepare(model, bits=bits, group_size=group_size, init="max", learn_scales=False)
    export_awq(model.eval(), out, dict(loaded.config.raw), teacher, force=True)
    return Path(out)


def folder_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def compare_models(work: str | os.PathLike, packed: str | os.PathLike | None = None) -> dict[str, tuple[Path, str | None]]:
    """Name -> (checkpoint folder, load-time quantization) of every model ``compare`` scores; the W3 rows
    only when the build made them."""
    work = Path(work)
    models = {"teacher_fp16": (work / "teacher" / "model", None),
              "rtn_w4g128": (work / "teacher" / "model", "rtn"),
              "qat_only_w4": (work / "qat-only" / "awq", None),
              "grace_w4": (Path(packed) if packed else work / "grace" / "awq", None)}
    harder = {"rtn_w3g128": (work / "rtn-w3" / "awq", None), "qat_only_w3": (work / "qat-only-w3" / "awq", None),
              "grace_w3": (work / "grace-w3" / "awq", None)}
    if any((path / "config.json").is_file() for path, _ in harder.values()):
        models.update(harder)
    return models


def compare(work: str | os.PathLike, n: int | None = None, seed: int = 0, packed: str | os.PathLike | None = None,
            progress: bool = False) -> dict:
    """Exact-match accuracy (with 95% Wilson intervals) of the teacher, RTN W4G128 of the teacher, the
    QAT-only W4 student and the GRACE W4 student (``packed``, default ``work/grace/awq``) on the held-out
    split, plus RTN / QAT-only / GRACE at W3G128 when the build made them."""
    from .evaluate import DEFAULT_HELDOUT, evaluate

    n = n or DEFAULT_HELDOUT
    results = {}
    for name, (path, quantize) in compare_models(work, packed).items():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} not found; build the demo first (python -m gracevlm.demo build)")
        res = evaluate(path, n=n, seed=seed, quantize=quantize, progress=progress)
        res["path"] = str(path)
        if name == "grace_w4" and n > 100:  # a cheap reproducibility check for tests of the shipped model
            res["accuracy_first_100"] = evaluate(path, n=100, seed=seed)["accuracy"]
        results[name] = res
        _say(f"{name:>13}: {res['accuracy']:.2f}% [{res['ci95'][0]:.1f}, {res['ci95'][1]:.1f}] of {res['n']} "
             f"({res['seconds']:.0f}s)")
    return results


def robustness(work: str | os.PathLike, n: int | None = None, seed: int = 0,
               packed: str | os.PathLike | None = None) -> dict:
    """The teacher and the GRACE W4 student at every view of ``evaluate.VIEWS`` (other sizes, non-square)."""
    from .evaluate import DEFAULT_HELDOUT, evaluate_views

    models = compare_models(work, packed)
    out = {}
    for name in ("teacher_fp16", "grace_w4"):
        out[name] = evaluate_views(models[name][0], n=n or DEFAULT_HELDOUT, seed=seed)
        summary = ", ".join(f"{view} {r['accuracy']:.1f}%" for view, r in out[name].items())
        _say(f"{name:>13}: {summary}")
    return out


def build(cfg: RecipeConfig, force: bool = False) -> dict:
    """Run the whole recipe; returns (and writes to ``work/results.json``) the accuracies, sizes and times."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    times = {}
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare_workspace(cfg, force)
    times["prepare_s"] = round(time.perf_counter() - t0, 1)
    common = dict(data=str(paths["data"] / "train.json"), image_folder=str(paths["data"]), seed=cfg.seed,
                  threads=cfg.threads, progress=cfg.progress, log_every=5)
    t = time.perf_counter()
    seeing = vision_stage(cfg, paths, force)
    times["vision_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    projected = projector_stage(cfg, seeing, paths, force)
    times["projector_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    teacher = _train("teacher", work, force, method="fp", model=str(projected), steps=cfg.teacher_steps,
                     batch_size=cfg.teacher_batch, lr=cfg.teacher_lr, warmup_ratio=cfg.teacher_warmup_ratio,
                     train_vision=cfg.teacher_train_vision,
                     projector_lr=(cfg.teacher_projector_lr if cfg.projector_steps > 0 else None), **common)
    times["teacher_s"] = round(time.perf_counter() - t, 1)
    student = dict(model=str(teacher), steps=cfg.student_steps, batch_size=cfg.student_batch, lr=cfg.student_lr,
                   scale_lr=cfg.scale_lr, **common)
    finals = {}
    for stage, (method, bits) in STUDENTS.items():
        if bits != 4 and not cfg.harder:
            continue
        t = time.perf_counter()
        extra = dict(teacher=str(teacher), rcka_warmup=cfg.rcka_warmup) if method == "grace" else {}
        finals[stage] = _train(stage, work, force, method=method, bits=bits, **extra, **student)
        times[f"{stage.replace('-', '_')}_s"] = round(time.perf_counter() - t, 1)
    if cfg.harder and (force or not (work / "rtn-w3" / "awq" / "config.json").is_file()):
        rtn_student(teacher, work / "rtn-w3" / "awq", bits=3)
    grace = finals["grace"]

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(grace, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _say(f"shipped the GRACE W4 student: {out} ({folder_bytes(out) / 2**20:.2f} MiB)")

    results = {"recipe": cfg.as_dict(), "sizes_bytes": {"packed_student": folder_bytes(out),
                                                        "teacher_fp16": folder_bytes(teacher)}}
    if cfg.evaluate:
        t = time.perf_counter()
        results["accuracy"] = compare(work, cfg.n_heldout, cfg.seed, packed=out, progress=cfg.progress)
        results["views"] = robustness(work, cfg.n_views, cfg.seed, packed=out)
        times["evaluate_s"] = round(time.perf_counter() - t, 1)
    times["total_s"] = round(time.perf_counter() - t0, 1)
    results["times"] = times
    text = json.dumps(results, indent=1) + "\n"
    (work / "results.json").write_text(text)
    if out.resolve() == MODEL_DIR.resolve():
        RESULTS_FILE.write_text(text)  # ships next to the model: how it was made and how it scored
    return results


LABELS = {"teacher_fp16": "teacher (fp16)", "rtn_w4g128": "round-to-nearest W4G128 of the teacher",
          "qat_only_w4": "QAT-only W4G128 (cross-entropy only)", "grace_w4": "GRACE W4G128 (the bundled model)",
          "rtn_w3g128": "round-to-nearest W3G128 of the teacher", "qat_only_w3": "QAT-only W3G128",
          "grace_w3": "GRACE W3G128"}


def results_table(results: dict) -> str:
    """The README's demo tables (Markdown) from a build's ``results.json``: every compared model with its
    95% interval and weakest question type, then the teacher and the shipped student at every view."""
    from .evaluate import wilson_interval

    lines = ["| model | accuracy | 95% CI | weakest question type |", "|---|---|---|---|"]
    for name, r in results.get("accuracy", {}).items():
        r = {"ci95": list(wilson_interval(r["correct"], r["n"])), **r}
        kind, acc = min(r["by_type"].items(), key=lambda kv: kv[1])
        lines.append(f"| {LABELS.get(name, name)} | {r['accuracy']:.2f}% | {r['ci95'][0]:.1f}-{r['ci95'][1]:.1f}% "
                     f"| {kind} {acc:.1f}% |")
    views = results.get("views") or {}
    if views:
        names = list(next(iter(views.values())))
        lines += ["", "| model | " + " | ".join(f"{v} px" for v in names) + " | weakest type, any view |",
                  "|---|" + "---|" * (len(names) + 1)]
        for name, per_view in views.items():
            worst = min(((k, a, v) for v, r in per_view.items() for k, a in r["by_type"].items()),
                        key=lambda t: t[1])
            cells = " | ".join(f"{per_view[v]['accuracy']:.2f}%" for v in names)
            lines.append(f"| {LABELS.get(name, name)} | {cells} | {worst[0]} {worst[1]:.1f}% ({worst[2]}) |")
    return "\n".join(lines)
