"""The JSON-object grammar of ``response_format: json_object`` against Python's ``json`` parser, and the
constrained decoding on a tiny model (every answer that stops parses as an object)."""
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gracevlm.engine.json_grammar import MAX_WS_RUN, START, accepts_prefix, feed, is_complete
from gracevlm.engine.vlm import load
from gracevlm.synth.checkpoint import synthesize

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
_objects = st.dictionaries(st.text(max_size=6), _values, max_size=4)


def _strict_loads(text: str):
    def no_constant(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=no_constant)


@settings(max_examples=150, deadline=None)
@given(_objects, st.sampled_from([None, 1, 2]), st.booleans())
def test_every_prefix_of_a_json_object_is_accepted(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    state = START
    for i, ch in enumerate(text):
        assert not is_complete(state), text[:i]
        state = feed(state, ch)
        assert state is not None, (text, i)
    assert is_complete(state)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='{}[]":,-+.eE0123 \n\\abtrunlsfu\x01', max_size=24))
def test_complete_exactly_when_json_parses_as_an_object(text):
    text = text.rstrip(" \n")
    try:
        parsed = _strict_loads(text)
        ok = isinstance(parsed, dict)
    except ValueError:
        ok = False
    runs = max((len(m) for m in re.findall(r"[ \n]+", text)), default=0)
    if runs <= MAX_WS_RUN:
        assert is_complete(feed(START, text)) == ok, text


def test_refusals():
    for bad in ('[1]', '"x"', '1', '{"a":01}', '{"a":1,}', '{"a" 1}', '{a:1}', '{"a":tru}', '{"a":"\x01"}',
                '{"a":"\\x"}', '{"a":1}}', '{"a":1} ', '{' + ' ' * (MAX_WS_RUN + 1)):
        assert feed(START, bad) is None or not is_complete(feed(START, bad)), bad
    assert not accepts_prefix('{"a":1}x') and accepts_prefix('{"a": [1, {"b": "\\u00e') and accepts_prefix(" {")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models decode much faster on one thread than on contended ones (a shared CI or dev CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load(synthesize(tmp_path_factory.mktemp("json") / "tiny", "tiny", "awq", seed=0, progress=False),
                device="cpu")


def _piece_text(tokenizer, token: int) -> str:
    piece = tokenizer.id_to_piece(token)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    return chr(int(m.group(1), 16)) if m else piece.replace("\u2581", " ")


def test_constrained_generation_always_parses(vlm):
    stopped = 0
    for kw in (dict(max_new_tokens=40), dict(max_new_tokens=80, temperature=1.0, seed=1),
               dict(max_new_tokens=40, temperature=0.7, seed=3, top_k=40)):
        g = vlm.generate("Answer in JSON: what is in the picture?", response_format="json_object", logprobs=3, **kw)
        if g.finish_reason == "stop":
            stopped += 1
            assert isinstance(_strict_loads(g.text), dict), g.text
        else:
            assert accepts_prefix(g.text), g.text
        # log-probabilities are of the masked distribution: every listed alternative keeps the JSON valid
        text = ""
        for entry, token in zip(g.logprobs, g.token_ids):
            state = feed(START, text)
            for alt, _ in entry.top:
                if alt != vlm.tokenizer.eos_id:
                    assert feed(state, _piece_text(vlm.tokenizer, alt)) is not None
            text += _piece_text(vlm.tokenizer, token)
    assert stopped >= 1  # this tiny model closes its object with seed 1 after 74 tokens
