"""Answer files: LLaVA-style JSONL, written one fsync'ed line at a time, resumable, chunkable, mergeable.

Each line is one answer (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``, plus
benchmark extras). A *key* identifies an answer within a question list: ``(str(question_id), occurrence)``,
where ``occurrence`` counts earlier items with the same id. Ids repeat in MME (two questions per image) and in
MMBench with ``--all-rounds`` (one line per round), so the id alone is not enough.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InputError


# -- keys -------------------------------------------------------------------------------------------------
def occurrence_keys(question_ids: Iterable[Any]) -> list[tuple[str, int]]:
    """``(str(id), n)`` for each id, n = how many times that id was seen before."""
    seen: dict[str, int] = {}
    keys = []
    for qid in question_ids:
        k = str(qid)
        n = seen.get(k, 0)
        seen[k] = n + 1
        keys.append((k, n))
    return keys


# -- chunks -----------------------------------------------------------------------------------------------
def split_chunks(items: Sequence, num_chunks: int) -> list[list]:
    """LLaVA's split: contiguous chunks of ceil(N / k) items (so there may be fewer than k chunks)."""
    if num_chunks < 1:
        raise InputError(f"--num-chunks must be >= 1, got {num_chunks}")
    if not items:
        return []
    size = math.ceil(len(items) / num_chunks)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Chunk ``chunk_idx`` of ``split_chunks``; an index past the last chunk gets an empty list (LLaVA would
    raise IndexError there)."""
    if not 0 <= chunk_idx < max(num_chunks, 1):
        raise InputError(f"--chunk-idx must be in [0, {num_chunks - 1}], got {chunk_idx}")
    chunks = split_chunks(items, num_chunks)
    return chunks[chunk_idx] if chunk_idx < len(chunks) else []


# -- reading ----------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike, strict: bool = True, what: str = "file") -> tuple[list[dict], int]:
    """Parse a JSON-lines file. Returns (records, number of unparsable lines).

    ``strict``: an unparsable line raises ``InputError`` (what ``json.loads`` per line does in the official
    scripts). Otherwise such lines are skipped and counted. Blank lines are unparsable too (``json.loads`` of an
    empty line fails), except a lone empty final line, which a file ending in a newline does not produce anyway.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist")
    records, bad = [], 0
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if strict:
                    raise InputError(f"{p}:{lineno}: not valid JSON ({exc.msg}); the official script aborts on "
                                     f"such a line too. Remove or repair it.") from None
                bad += 1
                continue
            records.append(rec)
    return records, bad


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {p} is not valid JSON: {exc}") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- resume -----------------------------------------------------------------------------------------------
def repair_tail(path: str | os.PathLike) -> int:
    """Cut a partial last line (no trailing newline, or not valid JSON): what a kill during a write leaves.
    Returns the number of bytes removed."""
    p = Path(path)
    if not p.is_file():
        return 0
    data = p.read_bytes()
    if not data:
        return 0
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except ValueError:
            keep = last_start
    if keep < len(data):
        with open(p, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return len(data) - keep


def answered_keys(path: str | os.PathLike) -> tuple[list[tuple[str, int]], int]:
    """Keys of the answers already in ``path`` (in file order) and the count of unparsable lines."""
    p = Path(path)
    if not p.is_file():
        return [], 0
    records, bad = read_jsonl(p, strict=False)
    return occurrence_keys(r.get("question_id") for r in records), bad


# -- writing ----------------------------------------------------------------------------------------------
class AnswerWriter:
    """Appends one JSON line per answer and makes it durable (flush + fsync) before returning."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def manifest_path(answers_file: str | os.PathLike) -> Path:
    p = Path(answers_file)
    return p.with_name(p.stem + ".manifest.json")


# -- merge ------------------------------------------------------------------------------------------------
def chunk_file_names(directory: str | os.PathLike, num_chunks: int) -> list[Path]:
    """LLaVA's chunk answer files ``{k}_{i}.jsonl`` for i in 0..k-1."""
    d = Path(directory)
    return [d / f"{num_chunks}_{i}.jsonl" for i in range(num_chunks)]


def check_answer_keys(expected: Sequence[tuple[str, int]], got: Sequence[tuple[str, int]]) -> dict:
    """Compare answer keys (file order) with the question list's keys (question order)."""
    exp_set = set(expected)
    counts: dict[tuple[str, int], int] = {}
    for k in got:
        counts[k] = counts.get(k, 0) + 1
    duplicates = sorted({k for k, n in counts.items() if n > 1})
    unknown = [k for k in counts if k not in exp_set]
    gaps = [k for k in expected if k not in counts]
    # order: the answers' keys (first occurrences, known only) must follow the question order
    position = {k: i for i, k in enumerate(expected)}
    seq = []
    seen = set()
    for k in got:
        if k in position and k not in seen:
            seen.add(k)
            seq.append(position[k])
    in_order = all(a < b for a, b in zip(seq, seq[1:]))
    return {"expected": len(expected), "answers": len(got), "duplicates": len(duplicates), "gaps": len(gaps),
            "unknown_ids": len(unknown), "in_question_order": in_order,
            "first_duplicates": [list(k) for k in duplicates[:5]], "first_gaps": [list(k) for k in gaps[:5]],
            "first_unknown": [list(k) for k in unknown[:5]]}


def merge_files(inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                expected_keys: Sequence[tuple[str, int]] | None, force: bool = False) -> dict:
    """Concatenate answer files in the given order into ``output`` (LLaVA's ``cat`` of the chunk files), after
    checking for unparsable lines, duplicates, gaps and ids not in the question list. Any problem raises
    ``InputError`` unless ``force``; the report says what was found either way."""
    lines: list[str] = []
    per_file = []
    bad_total = 0
    for f in inputs:
        p = Path(f)
        if not p.is_file():
            raise InputError(f"chunk answer file {p} does not exist (did chunk run finish?)")
        n, bad = 0, 0
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                lines.append(line if line.endswith("\n") else line + "\n")
                n += 1
        per_file.append({"file": str(p), "answers": n, "unparsable": bad})
        bad_total += bad
    keys = occurrence_keys(json.loads(line).get("question_id") for line in lines)
    report: dict[str, Any] = {"inputs": per_file, "output": str(output), "unparsable": bad_total}
    if expected_keys is not None:
        report.update(check_answer_keys(expected_keys, keys))
    else:
        report["answers"] = len(lines)
    problems = [name for name in ("duplicates", "gaps", "unknown_ids", "unparsable") if report.get(name)]
    if expected_keys is not None and not report["in_question_order"]:
        problems.append("order")
    report["problems"] = problems
    if problems and not force:
        raise InputError(f"merge found {', '.join(problems)}: {json.dumps({k: report[k] for k in report if k != 'inputs'})}"
                         f"; fix the chunks (re-run the incomplete ones: runs resume) or pass --force")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    report["written"] = len(lines)
    return report
