"""MMBench (eval-protocol.md 3.8): TSV with base64 images, option prompts, circular rows, xlsx submission."""
from __future__ import annotations

import base64
import binascii
import csv
import sys
from pathlib import Path

from ..engine.benchmark import ChoiceQuestion
from ..errors import InputError
from .answers import read_jsonl
from .common import IMAGE_TOKEN, MC_INSTRUCTION, MC_INSTRUCTION_CN, Item, pct

NAME = "mmbench"
MAX_NEW_TOKENS = 1024
LETTERS = ("A", "B", "C", "D")
CIRCULAR_OFFSET = 1_000_000
# Cells pandas.read_table turns into NaN by default (LLaVA reads the TSV with pandas).
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
DROPPED_FOR_SUBMISSION = ("hint", "category", "source", "image", "comment", "l2-category")
_MATCH_PUNCT = ".()[],:;!*#{}"
HANDLING = {
    "matching": "local stand-in for the server's matcher: a unique option letter among the answer's tokens "
                "(after turning .()[],:;!*#{} into spaces: 'A', 'A.', '(A)', 'A)', 'A:' ...), else the unique "
                "option whose text appears in the answer (case-insensitive); no GPT fallback, so such answers "
                "count as wrong ('failed')",
    "circular": "a base question (index mod 1e6) is correct only if every TSV row of it has an answer and all its "
                "answers are correct",
    "missing": "a TSV row without an answer makes its base question wrong",
    "duplicates": "the last line of a (question_id, round_id) wins",
    "unknown_ids": "answers whose index is not in the TSV are ignored",
    "unparsable": "the official converter aborts on an unparsable line; so does this one",
}


def _na(cell: str | None) -> str | None:
    return None if cell is None or cell in PANDAS_NA else cell


def is_none(value) -> bool:
    """LLaVA's is_none on a pandas cell: NaN/None, or the strings 'nan'/'none' in any case."""
    return value is None or value.lower() in ("nan", "none")


def read_tsv(path) -> tuple[list[str], list[dict]]:
    """Header and rows of an MMBench TSV; NA-like cells (as pandas reads them) become None."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"MMBench TSV {p} does not exist")
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    with open(p, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{p} is empty") from None
        rows = []
        for n, cells in enumerate(reader, 2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise InputError(f"{p}:{n}: {len(cells)} cells, header has {len(header)}")
            rows.append({h: _na(c) for h, c in zip(header, cells)})
    for col in ("index", "question", "A", "B"):
        if col not in header:
            raise InputError(f"{p}: column {col!r} missing (MMBench TSV columns: index, question, hint, A-D, ...)")
    for r in rows:
        try:
            r["index"] = int(r["index"])
        except (TypeError, ValueError):
            raise InputError(f"{p}: index {r['index']!r} is not an integer") from None
    return header, rows


def row_options(row: dict) -> list[str]:
    options = []
    for letter in LETTERS:
        value = row.get(letter)
        if is_none(value):
            break
        options.append(value)
    return options


def row_prompt(row: dict, options: list[str]) -> str:
    """Hint (if any), question, then ``\\nA. opt`` lines with the letters in order."""
    question = row["question"] or ""
    if not is_none(row.get("hint")):
        question = row["hint"] + "\n" + question
    for letter, option in zip(LETTERS, options):
        question = question + "\n" + letter + ". " + option
    return question


def _image_bytes(row: dict) -> bytes:
    try:
        return base64.b64decode(row.get("image") or "", validate=False)
    except (binascii.Error, ValueError):
        raise InputError(f"MMBench row {row['index']}: image cell is not base64") from None


def load_items(question_file, all_rounds: bool = False, lang: str = "en") -> list[list[Item]]:
    """model_vqa_mmbench --single-pred-prompt: one item per row, or one per rotation with ``all_rounds``."""
    if lang not in ("en", "cn"):
        raise InputError(f"--lang must be en or cn, got {lang!r}")
    instruction = MC_INSTRUCTION_CN if lang == "cn" else MC_INSTRUCTION
    _, rows = read_tsv(question_file)
    out = []
    for row in rows:
        options = row_options(row)
        chars = list(LETTERS[:len(options)])
        image = _image_bytes(row)
        rounds = len(options) if all_rounds else 1
        items = []
        for r in range(rounds):
            text = row_prompt(row, options)
            hint = None if is_none(row.get("hint")) else row["hint"]
            items.append(Item(row["index"], text, IMAGE_TOKEN + "\n" + text + "\n" + instruction, image,
                              before_prompt={"round_id": r},
                              after_text={"options": list(options), "option_char": list(chars)},
                              choice=ChoiceQuestion(row["question"] or "", tuple(options), hint)))
            options = options[1:] + options[:1]
            chars = chars[1:] + chars[:1]
        out.append(items)
    return out


def match_option(text: str, options: list[str]) -> str | None:
    """The option letter an answer names: a unique letter token, else a unique option text; None if neither."""
    letters = LETTERS[:len(options)]
    cleaned = text
    for c in _MATCH_PUNCT:
        cleaned = cleaned.replace(c, " ")
    tokens = set(cleaned.split())
    named = [ch for ch in letters if ch in tokens]
    if len(named) == 1:
        return named[0]
    if not named:
        low = text.lower()
        hits = [ch for ch, opt in zip(letters, options) if str(opt).lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


def score(question_file, result_file) -> dict:
    _, rows = read_tsv(question_file)
    by_index = {r["index"]: r for r in rows}
    if not any(r.get("answer") for r in rows):
        raise InputError(f"{question_file} has no 'answer' column values (a test split?); score it on the server "
                         "with `eval submit mmbench`")
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    latest: dict[tuple[int, int], dict] = {}
    unknown = 0
    for a in answers:
        try:
            qid = int(a.get("question_id"))
        except (TypeError, ValueError):
            unknown += 1
            continue
        if qid not in by_index:
            unknown += 1
            continue
        latest[(qid, int(a.get("round_id", 0) or 0))] = a
    row_results: dict[int, list[bool]] = {}
    failed = 0
    for (qid, _r), a in latest.items():
        row = by_index[qid]
        shown = a.get("options") or row_options(row)
        letter = match_option(a.get("text", ""), shown)
        if letter is None:
            failed += 1
            ok = False
        else:
            chars = a.get("option_char") or list(LETTERS[:len(shown)])
            original = chars[LETTERS.index(letter)] if LETTERS.index(letter) < len(chars) else None
            ok = original == row.get("answer")
        row_results.setdefault(qid, []).append(ok)
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("answer"):
            groups.setdefault(r["index"] % CIRCULAR_OFFSET, []).append(r)
    missing = 0
    correct_by_base: dict[int, bool] = {}
    for base, members in groups.items():
        ok = True
        for r in members:
            res = row_results.get(r["index"])
            if not res:
                missing += 1
                ok = False
            elif not all(res):
                ok = False
        correct_by_base[base] = ok

    def breakdown(column):
        acc: dict[str, list[bool]] = {}
        for base, members in groups.items():
            head = min(members, key=lambda r: r["index"])
            acc.setdefault(str(head.get(column)), []).append(correct_by_base[base])
        return {k: pct(sum(v), len(v)) for k, v in sorted(acc.items())}

    counts = {"results": len(answers), "missing": missing, "unparsable": 0, "failed": failed,
              "duplicates": len(answers) - unknown - len(latest), "unknown_ids": unknown,
              "base_questions": len(groups), "rows_scored": sum(len(m) for m in groups.values())}
    return {"benchmark": NAME, "accuracy": pct(sum(correct_by_base.values()), len(correct_by_base)),
            "per_category": breakdown("category"), "per_l2_category": breakdown("l2-category"),
            "counts": counts, "handling": HANDLING, "scale": "percent (circular)"}


def submit(question_file, result_file, output) -> dict:
    """convert_mmbench_for_submission.py: the TSV without hint/category/source/image/comment/l2-category, with a
    ``prediction`` column (raw text) inserted as the 7th column, written as xlsx."""
    try:
        from openpyxl import Workbook
    except ImportError:
        raise InputError("writing the MMBench xlsx needs openpyxl (pip install openpyxl==3.1.5)") from None
    header, rows = read_tsv(question_file)
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    preds: dict[int, str] = {}
    for a in answers:
        try:
            preds[int(a["question_id"])] = a.get("text")
        except (KeyError, TypeError, ValueError):
            continue
    columns = [h for h in header if h not in DROPPED_FOR_SUBMISSION]
    columns.insert(min(6, len(columns)), "prediction")
    wb = Workbook()
    ws = wb.active
    ws.append(columns)
    for r in rows:
        ws.append([preds.get(r["index"]) if c == "prediction" else r.get(c) for c in columns])
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    wb.save(out)
    return {"benchmark": NAME, "output": str(out), "rows": len(rows),
            "with_prediction": sum(1 for r in rows if r["index"] in preds)}


def format_text(res: dict) -> str:
    acc = res["accuracy"]
    lines = [f"MMBench circular accuracy: {'nan' if acc is None else f'{acc:.2f}'}%"]
    lines += [f"  {k}: {v:.2f}%" for k, v in res["per_category"].items() if v is not None]
    return "\n".join(lines)
