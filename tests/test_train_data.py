"""LLaVA conversation data: label masking (vicuna_v1), image placeholders, collation."""
import pytest
import torch

from gracevlm.demo.world import sample_corpus
from gracevlm.models.llava.processing import ImageSpec
from gracevlm.models.llava.chat import IMAGE_TOKEN_INDEX
from gracevlm.models.tokenizer import LlamaTokenizer, train_tokenizer
from gracevlm.models.llava.train_data import LlavaTrainingFormat, tokenize_conversation
from gracevlm.train.data import IGNORE_INDEX, ConversationDataset

RECORD = {"id": "x", "image": "a.png", "conversations": [
    {"from": "human", "value": "What color is the circle?\n<image>"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Where is the red circle?"}, {"from": "gpt", "value": "top left"}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), sample_corpus(200), 320)


def _supervised(ex, tok):
    runs, cur = [], []
    for t, y in zip(ex.input_ids, ex.labels):
        if y == IGNORE_INDEX:
            if cur:
                runs.append(cur)
                cur = []
        else:
            assert y == t
            cur.append(y)
    if cur:
        runs.append(cur)
    return runs


def test_only_assistant_answers_and_eos_are_supervised(tok):
    ex = tokenize_conversation(RECORD, tok)
    assert ex.input_ids[0] == tok.bos_id and ex.labels[0] == IGNORE_INDEX
    assert ex.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    # <image> moved to the front of the first message, as LLaVA does
    after_image = tok.decode(ex.input_ids[ex.input_ids.index(IMAGE_TOKEN_INDEX) + 1:], skip_special_tokens=False)
    assert after_image.startswith("\nWhat color is the circle? ASSISTANT: red</s>")
    runs = _supervised(ex, tok)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == ["red</s>", "top left</s>"]
    assert runs[0][-1] == tok.eos_id


def test_label_masking_with_non_legacy_tokenizer(tok):
    nl = LlamaTokenizer(tok.model_file, legacy=False)
    ex = tokenize_conversation(RECORD, nl)
    assert [nl.decode(r, skip_special_tokens=False) for r in _supervised(ex, nl)] == ["red</s>", "top left</s>"]


def test_text_only_and_leading_gpt_message(tok):
    rec = {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "How many objects?"},
                             {"from": "gpt", "value": "2"}]}
    ex = tokenize_conversation(rec, tok)
    assert IMAGE_TOKEN_INDEX not in ex.input_ids and ex.image is None
    assert [tok.decode(r) for r in _supervised(ex, tok)] == ["2"]


def test_collate_expands_images_and_pads(tok, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}]}
    ds = ConversationDataset([RECORD, text_only], LlavaTrainingFormat(tok, ImageSpec(size=32)), tmp_path)
    batch = ds.collate([0, 1], n_patches=4)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert int((ids[0] == IMAGE_TOKEN_INDEX).sum()) == 4 and int((ids[1] == IMAGE_TOKEN_INDEX).sum()) == 0
    n0 = len(ds.example(0).input_ids) + 3
    assert int(mask[0].sum()) == n0 and ids.shape[1] == n0
    assert bool((labels[1][mask[1] == 0] == IGNORE_INDEX).all()) and bool((ids[1][mask[1] == 0] == tok.pad_id).all())
    assert bool((labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all())
    assert torch.equal(labels[0][labels[0] != IGNORE_INDEX],
                       torch.tensor([t for t in ds.example(0).labels if t != IGNORE_INDEX]))
