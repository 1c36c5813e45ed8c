"""``eval report``: collect score JSONs of run folders into JSON + Markdown and a bar chart with the published
LLaVA-1.5-7B figures as reference markers."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .answers import write_json_atomic

# (benchmark, key in the score JSON, label, factor to the published scale, LLaVA-1.5-7B, LLaVA-1.5-13B)
METRICS = (
    ("vqav2", "overall", "VQAv2", 1.0, 78.5, 80.0),
    ("gqa", "accuracy", "GQA", 1.0, 62.0, 63.3),
    ("scienceqa", "img_accuracy", "SQA-IMG", 1.0, 66.8, 71.6),
    ("textvqa", "accuracy", "TextVQA", 1.0, 58.2, 61.3),
    ("pope", "mean_f1", "POPE (mean F1 %)", 100.0, 85.9, 85.9),
    ("mme", "perception", "MME-P", 1.0, 1510.7, 1531.3),
    ("mmbench", "accuracy", "MMBench-dev", 1.0, 64.3, 67.7),
    ("seed", "accuracy", "SEED", 1.0, 58.6, 61.6),
    ("seed", "image_accuracy", "SEED-IMG", 1.0, 66.1, 68.2),
)
SCORE_SUFFIX = ".score.json"


def find_scores(run_dir: str | Path) -> dict[str, dict]:
    """benchmark -> newest score JSON (by mtime) found under ``run_dir``."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"run folder {root} does not exist")
    found: dict[str, tuple[float, Path, dict]] = {}
    for p in sorted(root.rglob("*" + SCORE_SUFFIX)):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        bench = data.get("benchmark") if isinstance(data, dict) else None
        if not bench:
            continue
        mtime = p.stat().st_mtime
        if bench not in found or mtime >= found[bench][0]:
            found[bench] = (mtime, p, data)
    return {b: {**d, "_file": str(p)} for b, (_, p, d) in found.items()}


def build_report(run_dirs: list[str | Path], labels: list[str] | None = None) -> dict:
    if labels and len(labels) != len(run_dirs):
        raise InputError(f"{len(labels)} --label values for {len(run_dirs)} run folders")
    runs = []
    for i, d in enumerate(run_dirs):
        scores = find_scores(d)
        label = labels[i] if labels else Path(d).resolve().name
        metrics = {}
        for bench, key, name, factor, _, _ in METRICS:
            if bench in scores and scores[bench].get(key) is not None:
                s = scores[bench]
                metrics[name] = {"value": s[key] * factor, "benchmark": bench, "key": key, "file": s["_file"],
                                 "counts": s.get("counts", {}), "complete": s.get("complete", True)}
        runs.append({"label": label, "path": str(d), "metrics": metrics})
    reference = {name: {"llava-1.5-7b": r7, "llava-1.5-13b": r13} for _, _, name, _, r7, r13 in METRICS}
    return {"runs": runs, "reference": reference,
            "note": "POPE is shown as mean F1 x 100; MME-P in points (max 2000); others in percent. Reference: "
                    "published LLaVA-1.5 figures (eval-protocol.md)."}


def to_markdown(report: dict) -> str:
    runs = report["runs"]
    head = "| metric | " + " | ".join(r["label"] for r in runs) + " | LLaVA-1.5-7B (published) |"
    sep = "|---|" + "---|" * len(runs) + "---|"
    rows = [head, sep]
    for _, _, name, _, r7, _ in METRICS:
        cells = []
        for r in runs:
            m = r["metrics"].get(name)
            cells.append("" if m is None else f"{m['value']:.2f}" + ("" if m["complete"] else " (partial)"))
        if any(cells):
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {r7} |")
    return "# gracevlm evaluation report\n\n" + "\n".join(rows) + "\n\n" + report["note"] + "\n"


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for _, _, name, _, _, _ in METRICS if any(name in r["metrics"] for r in report["runs"])]
    if not names:
        names = [name for _, _, name, _, _, _ in METRICS]
    runs = report["runs"]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        values = [r["metrics"].get(name, {}).get("value", 0.0) for r in runs]
        xs = list(range(len(runs)))
        ax.bar(xs, values, color=[f"C{i % 10}" for i in xs])
        ref = report["reference"][name]["llava-1.5-7b"]
        ax.axhline(ref, color="k", linestyle="--", linewidth=1, label="LLaVA-1.5-7B")
        ax.plot([len(runs) - 0.5], [ref], marker="<", color="k")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["label"] for r in runs], rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, labels: list[str] | None = None,
                 chart: bool = True) -> dict:
    report = build_report(run_dirs, labels)
    out = Path(out_dir) if out_dir else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    if chart:
        files["png"] = str(out / "report.png")
        plot(report, files["png"])
    report["files"] = files
    write_json_atomic(files["json"], report)
    Path(files["markdown"]).write_text(to_markdown(report), encoding="utf-8")
    return report
