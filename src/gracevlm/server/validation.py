"""One clear line for a request body that fails validation (pydantic's first error is often the wrong one).

For a field typed as a union (``content``: a string or a list of parts) pydantic reports one error per
branch, the first being "content.str: Input should be a valid string" even when the client sent a list
with an unknown part type. ``describe_validation_error`` drops the union-branch labels from the location
and picks the error that went deepest into the data, so the message names the part that is wrong.
"""
from __future__ import annotations

import re

import pydantic

_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|tagged-union\[.*|function-.*|[A-Z]\w*)$")
_TYPE_ONLY = {"string_type", "list_type", "dict_type", "model_type", "int_type", "float_type", "bool_type",
              "none_required", "model_attributes_type", "int_parsing", "float_parsing", "bool_parsing"}


def _clean_loc(loc: tuple) -> tuple:
    """Location without union-branch labels; a tagged union's tag repeated before its field (our tags
    are the field names: ``text.text``) is collapsed."""
    out: list = []
    for p in loc:
        if isinstance(p, str) and _BRANCH.match(p) or (out and p == out[-1] and isinstance(p, str)):
            continue
        out.append(p)
    return tuple(out)


def describe_validation_error(exc: pydantic.ValidationError) -> tuple[str | None, str]:
    """``(param, message)`` for the most specific error of ``exc`` (param: dotted location or None)."""
    errors = exc.errors(include_url=False)
    best = max(errors, key=lambda e: (len(_clean_loc(e.get("loc", ()))), e.get("type") not in _TYPE_ONLY))
    loc = _clean_loc(best.get("loc", ()))
    param = ".".join(str(p) for p in loc) or None
    same = [e for e in errors if _clean_loc(e.get("loc", ())) == loc]
    if len(same) > 1 and all(e.get("type") in _TYPE_ONLY for e in same):
        kinds = " or ".join(e.get("msg", "").replace("Input should be ", "") for e in same)
        msg = f"Input should be {kinds}"
    elif best.get("type") == "union_tag_invalid":
        tag = (best.get("ctx") or {}).get("tag")
        expected = (best.get("ctx") or {}).get("expected_tags")
        msg = f"unknown content part type {tag!r}; expected one of {expected}"
    else:
        msg = str(best.get("msg"))
    return param, (f"{param}: {msg}" if param else msg)
