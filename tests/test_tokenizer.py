import json
import time

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gracevlm.errors import CheckpointError, InputError
from gracevlm.synth.corpus import default_corpus
from gracevlm.models.tokenizer import LlamaTokenizer, StreamDecoder, train_tokenizer

VOCAB = 1000


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, default_corpus(), VOCAB)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return LlamaTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def raw_sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


# ---------------------------------------------------------------------------- training


def test_train_writes_only_the_three_files_with_llama_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SentencePiece must not drop model/vocab files into the cwd either
    start = time.perf_counter()
    tok = train_tokenizer(tmp_path / "t", default_corpus(), VOCAB)
    assert time.perf_counter() - start < 5.0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert 900 <= tok.vocab_size <= VOCAB
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3, 13, 258)] == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"]
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<s>", "</s>", "<unk>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["legacy"] is True
    assert config["model_max_length"] == 2048 and config["padding_side"] == "right"
    special = json.loads((tmp_path / "t" / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    spec = spm.SentencePieceProcessor(model_file=str(tmp_path / "t" / "tokenizer.model"))
    assert spec.encode("1234", out_type=str) == ["▁", "1", "2", "3", "4"]  # split_digits


def test_train_is_deterministic(tmp_path):
    a = train_tokenizer(tmp_path / "a", default_corpus(), VOCAB)
    b = train_tokenizer(tmp_path / "b", default_corpus(), VOCAB)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a.vocab_size == b.vocab_size
    assert default_corpus() == default_corpus()
    assert len(default_corpus()) >= 2000


def test_train_rejects_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="empty"):
        train_tokenizer(tmp_path, ["", "\n"], VOCAB)
    with pytest.raises(InputError, match="vocab_size"):
        train_tokenizer(tmp_path, ["hello"], 100)
    with pytest.raises(InputError, match="not one str"):
        train_tokenizer(tmp_path, "hello world", VOCAB)


def test_corpus_covers_llava_strings():
    text = "\n".join(default_corpus())
    for s in ("USER:", "ASSISTANT:", "Answer the question using a single word or phrase.",
              "Answer with the option's letter from the given choices directly.",
              "A chat between a curious user and an artificial intelligence assistant.",
              "A chat between a curious human", "café", "naïve", "日本語", "😀"):
        assert s in text
    assert all("\n" not in line for line in default_corpus())


# ---------------------------------------------------------------------------- encode / decode


def test_encode_matches_sentencepiece_per_segment(tok, raw_sp):
    for text in ("USER: ", "\nWhat is this?", "café 日本 😀 🦀 €", "  two  spaces ", "a chat 12345"):
        assert tok.encode(text) == [1] + raw_sp.encode(text)
        assert tok.encode(text, add_bos=False) == raw_sp.encode(text)
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []
    # a newline is a byte-fallback piece, as in LLaMA (id 13)
    assert raw_sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]


def test_special_token_strings_in_text_become_ids(tok, raw_sp):
    ids = tok.encode("hi</s>USER: ok<s>x<unk>")
    # legacy slow-tokenizer rule: each text segment is encoded alone, with its own dummy prefix
    assert ids == [1, *raw_sp.encode("hi"), 2, *raw_sp.encode("USER: ok"), 1, *raw_sp.encode("x"), 0]
    assert tok.id_to_piece(ids[ids.index(2) + 1]).startswith("▁")
    assert tok.encode("<s>") == [1, 1]
    assert tok.encode("</s></s>", add_bos=False) == [2, 2]
    # "<s" alone is not special
    assert 1 not in tok.encode("<s", add_bos=False)


def test_decode(tok):
    ids = tok.encode("hi</s>USER: ok<s>x<unk>")
    assert tok.decode(ids) == "hi USER: ok x"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>USER: ok<s>x<unk>"
    text = "USER: What colour is the café? 日本 🦀\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([-200, *tok.encode("a cat"), -200, 2]) == "a cat"
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2581"), max_size=40))
def test_round_trip_of_text_without_special_strings(tok, text):
    text = text.replace("<s>", "").replace("</s>", "").replace("<unk>", "")
    assert tok.decode(tok.encode(text)) == text


def test_properties_and_config_strings(tok, tok_dir, tmp_path):
    assert tok.pad_id == tok.unk_id == 0
    assert tok.special_ids >= {0, 1, 2}
    # AddedToken-style dicts in tokenizer_config.json are understood
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    assert LlamaTokenizer.from_dir(tmp_path).bos_id == 1


# ---------------------------------------------------------------------------- errors


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.model.*must ship"):
        LlamaTokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        LlamaTokenizer.from_dir(tmp_path / "nope")


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model\xff" * 10)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model.*not a valid SentencePiece model"):
        LlamaTokenizer.from_dir(tmp_path)


def test_bad_config_files(tok_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LlamaTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<BOS>"}))
    with pytest.raises(CheckpointError, match="bos token '<BOS>' is not a piece"):
        LlamaTokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------- streaming

MULTIBYTE = ["é", "日本", "😀", "🦀", "€", "Ж", "naïve", "café", " ", "  ", "\n", "a", "ß", "👍🏽"]


def _stream(tok, ids, skip):
    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    return deltas, decoder


@st.composite
def id_sequences(draw, vocab_size):
    byte_ids = st.integers(3, 258)  # <0x00>..<0xFF>
    any_id = st.integers(0, vocab_size - 1)
    pieces = st.one_of(
        any_id.map(lambda i: [i]),
        byte_ids.map(lambda i: [i]),
        st.sampled_from(MULTIBYTE).map(lambda s: ("enc", s)),
        st.sampled_from([[0], [1], [2], [-200]]),
        # UTF-8 bytes of a multibyte character, possibly cut short
        st.tuples(st.sampled_from(["é", "日", "😀", "€"]), st.integers(1, 4)).map(
            lambda t: [3 + b for b in t[0].encode()[: t[1]]]),
    )
    return draw(st.lists(pieces, max_size=30))


def _flatten(tok, parts):
    ids = []
    for part in parts:
        if isinstance(part, tuple):
            ids.extend(tok.encode(part[1], add_bos=False))
        else:
            ids.extend(part)
    return ids


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_stream_decoder_concatenation_equals_decode(tok, data, skip):
    ids = _flatten(tok, data.draw(id_sequences(tok.vocab_size)))
    deltas, decoder = _stream(tok, ids, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert len(decoder._window) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(MULTIBYTE + ["the cat", "USER:", "?", "1 2"]), max_size=20))
def test_stream_decoder_never_emits_partial_characters(tok, words):
    ids = tok.encode("".join(words), add_bos=False)
    deltas, _ = _stream(tok, ids, True)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == "".join(words)


def test_stream_decoder_holds_back_byte_pieces(tok):
    crab = tok.encode("🦀", add_bos=False)
    assert [tok.id_to_piece(i) for i in crab] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in [*tok.encode("a", add_bos=False), *crab]] == ["a", " ", "", "", "", "🦀"]
    assert decoder.flush() == ""
    # an incomplete character at the end comes out as U+FFFD only on flush, as decode() gives it
    decoder = StreamDecoder(tok)
    assert decoder.push(3 + 0xE2) == "" and decoder.push(3 + 0x82) == ""
    assert decoder.flush() == tok.decode([3 + 0xE2, 3 + 0x82]) == "\ufffd\ufffd"


def test_stream_decoder_leading_space_and_specials(tok):
    space = tok.piece_to_id("▁")
    ids = [1, space, space, *tok.encode("hi", add_bos=False), 2, space, *tok.encode("x", add_bos=False)]
    for skip in (True, False):
        deltas, _ = _stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == "  hi  x"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>  hi</s> x"


def test_stream_decoder_window_stays_small(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 日本 🦀 " * 200, add_bos=False)
    decoder = StreamDecoder(tok)
    longest = 0
    out = []
    for i in ids:
        out.append(decoder.push(i))
        longest = max(longest, len(decoder._window))
    out.append(decoder.flush())
    assert "".join(out) == tok.decode(ids)
    assert longest <= 6


def test_non_legacy_tokenizer_drops_prefix_after_special_tokens(tmp_path):
    import json

    from gracevlm.models.tokenizer import LlamaTokenizer, train_tokenizer
    from gracevlm.synth.corpus import default_corpus

    legacy = train_tokenizer(tmp_path, default_corpus(), 600)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["legacy"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    modern = LlamaTokenizer.from_dir(tmp_path)
    assert legacy.legacy and not modern.legacy
    text = "answer</s>USER: hi"
    a, b = legacy.encode(text, add_bos=False), modern.encode(text, add_bos=False)
    assert a[: a.index(2) + 1] == b[: b.index(2) + 1]  # before the special token: identical
    after_legacy = [legacy.id_to_piece(i) for i in a[a.index(2) + 1:]]
    after_modern = [modern.id_to_piece(i) for i in b[b.index(2) + 1:]]
    assert after_legacy[0].startswith("\u2581") and not after_modern[0].startswith("\u2581")
    assert "".join(after_modern).replace("\u2581", " ") == "USER: hi"
