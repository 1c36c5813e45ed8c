import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gracevlm.errors import InputError
from gracevlm.synth.corpus import default_corpus
from gracevlm.models.llava.chat import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    default_conv_mode,
    get_template,
    prepare_user_text,
    render_prompt,
    tokenize_with_images,
)
from gracevlm.models.tokenizer import train_tokenizer

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")
SHORT = "Answer the question using a single word or phrase."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, default_corpus(), 1000)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from gracevlm.models.tokenizer import LlamaTokenizer

    return LlamaTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


# ---------------------------------------------------------------------------- templates


def test_vicuna_single_turn_with_image():
    query = "What is the colour of the bus?\n" + SHORT
    prompt = render_prompt([user(prepare_user_text(query, 1))], "vicuna_v1")
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is the colour of the bus?\n"
        "Answer the question using a single word or phrase. ASSISTANT:")
    assert prompt == f"{VICUNA} USER: <image>\n{query} ASSISTANT:"
    assert render_prompt([user("<image>\n" + query)], "v1") == prompt
    assert render_prompt([user("<image>\n" + query), assistant("")]) == prompt  # default template
    assert render_prompt([user("<image>\n" + query), assistant(None)]) == prompt


def test_vicuna_multi_turn_with_images_in_several_turns():
    messages = [
        user(prepare_user_text("What is this?", 1)), assistant("A dog."),
        user(prepare_user_text("And this?", 1)), assistant("A cat."),
        user("Which is bigger?"),
    ]
    assert render_prompt(messages, "vicuna_v1") == (
        VICUNA + " USER: <image>\nWhat is this? ASSISTANT: A dog.</s>USER: <image>\nAnd this? ASSISTANT: A cat.</s>"
        "USER: Which is bigger? ASSISTANT:")


def test_llava_v1_and_text_only():
    assert render_prompt([user("<image>\nDescribe it.")], "llava_v1") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nDescribe it. ASSISTANT:")
    text_only = prepare_user_text("Which is a mammal?\nA. shark\nB. whale\n"
                                  "Answer with the option's letter from the given choices directly.", 0)
    assert render_prompt([user(text_only)]) == (
        VICUNA + " USER: Which is a mammal?\nA. shark\nB. whale\n"
        "Answer with the option's letter from the given choices directly. ASSISTANT:")
    # a conversation ending in a filled assistant turn keeps its </s>
    assert render_prompt([user("Hi"), assistant("Hello.")], "llava_v1") == LLAVA + " USER: Hi ASSISTANT: Hello.</s>"


def test_plain_template():
    t = get_template("plain")
    assert (t.system, t.roles, t.sep) == ("", ("", ""), "\n")
    assert render_prompt([user("<image>\nWhat is this?")], "plain") == "<image>\nWhat is this?\n"
    assert render_prompt([user("<image>"), assistant("A dog."), user("<image>")], "plain") == (
        "<image>\nA dog.\n<image>\n")


def test_get_template_errors_and_aliases():
    assert get_template("v1") is get_template("vicuna_v1")
    assert get_template(get_template("plain")).name == "plain"
    with pytest.raises(InputError, match="unknown conversation template 'chatml'.*llava_v1, plain, v1, vicuna_v1"):
        get_template("chatml")
    with pytest.raises(InputError, match="unknown conversation template"):
        render_prompt([user("hi")], "mistral")


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([assistant("hi")], "must be 'user'"),
    ([user("a"), user("b")], "must be 'assistant'"),
    ([user("")], "message 0 .* is empty"),
    ([user("a"), assistant(""), user("b")], "message 1 .* is empty"),
    ([user(3)], "must be a str"),
    (["hello"], "must be a dict"),
    ("hello", "list of"),
])
def test_render_prompt_rejects_bad_messages(messages, match):
    with pytest.raises(InputError, match=match):
        render_prompt(messages)


# ---------------------------------------------------------------------------- image placeholders


def test_prepare_user_text():
    assert prepare_user_text("What?", 1) == "<image>\nWhat?"
    assert prepare_user_text("What?", 2) == "<image>\n<image>\nWhat?"
    assert prepare_user_text("What?", 0) == "What?"
    assert prepare_user_text("What? <image>", 1) == "What? <image>"  # the user's own placement is kept
    with pytest.raises(InputError, match="prompt has 2 <image> placeholders but 1 image was given"):
        prepare_user_text("<image> <image> What?", 1)
    with pytest.raises(InputError, match="prompt has 1 <image> placeholder but 0 images were given"):
        prepare_user_text("<image>\nWhat?", 0)
    with pytest.raises(InputError, match="prompt has 1 <image> placeholder but 3 images were given"):
        prepare_user_text("<image>\nWhat?", 3)
    with pytest.raises(InputError, match="non-negative"):
        prepare_user_text("What?", -1)


def test_splice_rule_around_the_image(tok, sp):
    prompt = "USER: <image>\nWhat"
    ids = tokenize_with_images(prompt, tok)
    space, newline = sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")
    assert sp.id_to_piece(space) == "▁" and newline == 13
    # each chunk is encoded on its own by SentencePiece: "USER: " ends with a lone "▁" and "\nWhat" starts
    # with the dummy prefix "▁" followed by the newline byte (LLaMA: 29871, -200, 29871, 13)
    assert ids == [1, *sp.encode("USER: "), IMAGE_TOKEN_INDEX, *sp.encode("\nWhat")]
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[k - 1:k + 3] == [space, IMAGE_TOKEN_INDEX, space, newline]
    assert ids.count(1) == 1 and ids[0] == 1
    # tokenising the whole prompt at once gives different ids
    whole = tok.encode(prompt)
    assert whole != ids and whole != [i for i in ids if i != IMAGE_TOKEN_INDEX]


def test_splice_full_vicuna_prompt(tok, sp):
    prompt = render_prompt([user(prepare_user_text("Is there a dog?\n" + SHORT, 1))])
    ids = tokenize_with_images(prompt, tok)
    before, after = prompt.split(IMAGE_TOKEN)
    assert ids == [1, *sp.encode(before), IMAGE_TOKEN_INDEX, *sp.encode(after)]
    assert sp.id_to_piece(ids[ids.index(-200) - 1]) == "▁"
    # the dummy-prefix "▁" of the chunk after the image survives as an extra space when decoded
    assert tok.decode(ids) == before + " " + after


def test_splice_edge_cases(tok, sp):
    # prompt starting with <image>: the empty first chunk adds nothing after BOS
    assert tokenize_with_images("<image>\nHi", tok) == [1, IMAGE_TOKEN_INDEX, *sp.encode("\nHi")]
    # adjacent placeholders: the empty middle chunk adds nothing
    assert tokenize_with_images("a<image><image>b", tok) == [
        1, *sp.encode("a"), IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, *sp.encode("b")]
    assert tokenize_with_images("<image>", tok) == [1, IMAGE_TOKEN_INDEX]
    # trailing placeholder
    assert tokenize_with_images("a <image>", tok) == [1, *sp.encode("a "), IMAGE_TOKEN_INDEX]
    # no placeholder: plain encoding
    assert tokenize_with_images("Hello there", tok) == tok.encode("Hello there")
    assert tokenize_with_images("", tok) == [1]


def _llava_reference(prompt, tok):
    """LLaVA's rule restated: encode every chunk with BOS; if the first chunk starts with BOS keep that one
    BOS and strip one leading id from every chunk; put one image index between chunks."""
    chunks = [tok.encode(c, add_bos=True) for c in prompt.split("<image>")]
    strip = 1 if chunks[0][:1] == [tok.bos_id] else 0
    out = [tok.bos_id] if strip else []
    for n, chunk in enumerate(chunks):
        out += ([IMAGE_TOKEN_INDEX] if n else []) + chunk[strip:]
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["<image>", "\n", " ", "USER: ", "What?", "日本", "</s>", "<s>", "x"]), max_size=12))
def test_splice_matches_llava_rule(tok, parts):
    prompt = "".join(parts)
    ids = tokenize_with_images(prompt, tok)
    assert ids == _llava_reference(prompt, tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == prompt.count("<image>")


# ---------------------------------------------------------------------------- conv mode


def test_default_conv_mode():
    assert default_conv_mode({"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"}) == "vicuna_v1"
    assert default_conv_mode({"tune_mm_mlp_adapter": False}) == "vicuna_v1"
    assert default_conv_mode({"tune_mm_mlp_adapter": True}) == "plain"
    assert default_conv_mode({"conv_mode": "llava_v1", "tune_mm_mlp_adapter": True}) == "llava_v1"
    assert default_conv_mode({"conv_mode": "v1"}) == "vicuna_v1"
    with pytest.raises(InputError, match="unknown conversation template"):
        default_conv_mode({"conv_mode": "nope"})
