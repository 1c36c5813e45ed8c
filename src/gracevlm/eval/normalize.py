"""Answer normalisation and soft accuracy of the VQA family (eval-protocol.md section 2).

Two processors share the same building blocks:

* ``evalai_normalize`` is the EvalAI answer processor that LLaVA applies to VQAv2 predictions before
  submission and that the TextVQA scorer applies to predictions and to every ground-truth answer. It runs
  five steps in order (``step1_word_tokenize`` ... ``step5_digits_articles``).
* ``vqa_official_accuracy`` is the per-question rule of the official VQA evaluator: step 2 always, steps 3-5
  only when the ten ground-truth answers are not all identical; for unanimous ground truth it compares the
  whitespace-cleaned raw strings.

Every quirk is kept on purpose: the punctuation test looks at the string as it entered step 3, period
deletion stops after 32 deletions, number words and articles are handled per token, and contraction keys
with capitals never match the lower-cased tokens.
"""
from __future__ import annotations

import re
from typing import Sequence

# Step 3 punctuation characters, in the order the processor visits them.
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period that is not immediately followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The reference processors pass re.UNICODE (== 32) where re.sub expects ``count``: at most 32 deletions.
PERIOD_DELETION_LIMIT = 32

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
    """The VQA contraction table: spelling as typed -> canonical spelling.

    Written here as canonical form -> the spellings that map to it (space separated). It reproduces the table
    of the official VQA evaluator entry for entry, including its oddities: a few keys carry capitals (they
    can never match lower-cased tokens), ``let's`` and ``she's`` map to themselves, and ``somebody'd`` maps
    to ``somebodyd`` (the only entry that removes an apostrophe).
    """
    groups = {
        "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve", "couldn't": "couldnt",
        "couldn't've": "couldn'tve couldnt've", "didn't": "didnt", "doesn't": "doesnt", "don't": "dont",
        "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve", "hasn't": "hasnt", "haven't": "havent",
        "he'd": "hed", "he'd've": "hed've he'dve", "he's": "hes", "how'd": "howd", "how'll": "howll",
        "how's": "hows", "I'd've": "Id've I'dve", "I'm": "Im", "I've": "Ive", "isn't": "isnt", "it'd": "itd",
        "it'd've": "itd've it'dve", "it'll": "itll", "let's": "let's", "ma'am": "maam", "mightn't": "mightnt",
        "mightn't've": "mightnt've mightn'tve", "might've": "mightve", "mustn't": "mustnt", "must've": "mustve",
        "needn't": "neednt", "not've": "notve", "o'clock": "oclock", "oughtn't": "oughtnt",
        "'ow's'at": "ow's'at 'ows'at 'ow'sat", "shan't": "shant", "she'd've": "shed've she'dve",
        "she's": "she's", "should've": "shouldve", "shouldn't": "shouldnt",
        "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd",
        "somebody'd've": "somebodyd've somebody'dve", "somebody'll": "somebodyll", "somebody's": "somebodys",
        "someone'd": "someoned", "someone'd've": "someoned've someone'dve", "someone'll": "someonell",
        "someone's": "someones", "something'd": "somethingd", "something'd've": "somethingd've something'dve",
        "something'll": "somethingll", "that's": "thats", "there'd": "thered",
        "there'd've": "thered've there'dve", "there're": "therere", "there's": "theres", "they'd": "theyd",
        "they'd've": "theyd've they'dve", "they'll": "theyll", "they're": "theyre", "they've": "theyve",
        "'twas": "twas", "wasn't": "wasnt", "we'd've": "wed've we'dve", "we've": "weve", "weren't": "werent",
        "what'll": "whatll", "what're": "whatre", "what's": "whats", "what've": "whatve", "when's": "whens",
        "where'd": "whered", "where's": "wheres", "where've": "whereve", "who'd": "whod",
        "who'd've": "whod've who'dve", "who'll": "wholl", "who's": "whos", "who've": "whove", "why'll": "whyll",
        "why're": "whyre", "why's": "whys", "won't": "wont", "would've": "wouldve", "wouldn't": "wouldnt",
        "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall", "y'all'll": "yall'll y'allll",
        "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd": "youd", "you'd've": "youd've you'dve",
        "you'll": "youll", "you're": "youre", "you've": "youve",
    }
    table: dict[str, str] = {}
    for canonical, spellings in groups.items():
        for spelling in spellings.split():
            table[spelling] = canonical
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


# -- the five steps ---------------------------------------------------------------------------------------
def step1_word_tokenize(text: str) -> str:
    """Lower-case, delete ``,`` and ``?``, split off ``'s`` (``man's`` -> ``man 's``), strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def step2_whitespace(text: str) -> str:
    """Newlines and tabs become spaces; strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def step3_punctuation(text: str) -> str:
    """For each punctuation character p (in ``PUNCTUATION`` order): delete every p when the string *as it
    entered this step* has p next to a space (``p `` or `` p``) or any digit-comma-digit sequence; otherwise
    replace every p by a space. Edits accumulate on the output string only."""
    entered = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(entered) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " " in entered) or (" " + p in entered) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return out


def step4_periods(text: str) -> str:
    """Delete periods not followed by a digit, at most ``PERIOD_DELETION_LIMIT`` (32) of them."""
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=PERIOD_DELETION_LIMIT)


def step5_digits_articles(text: str) -> str:
    """Lower-case, split on whitespace, map number words to digits, drop articles, then map tokens found in
    the contraction table; join with single spaces."""
    tokens = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            tokens.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in tokens)


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor: steps 1-5 in order."""
    text = step1_word_tokenize(text)
    text = step2_whitespace(text)
    text = step3_punctuation(text)
    text = step4_periods(text)
    return step5_digits_articles(text)


def vqa_process(text: str) -> str:
    """Steps 3-5: what the official VQA evaluator applies to answers of non-unanimous questions."""
    return step5_digits_articles(step4_periods(step3_punctuation(text)))


# -- soft accuracy ----------------------------------------------------------------------------------------
def soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Mean over annotators i of min(1, #{j != i : g_j == prediction} / 3)."""
    if not gt_answers:
        raise ValueError("soft accuracy needs at least one ground-truth answer")
    accs = []
    for i in range(len(gt_answers)):
        matches = sum(1 for j, g in enumerate(gt_answers) if j != i and g == prediction)
        accs.append(min(1.0, float(matches) / 3))
    return float(sum(accs)) / len(accs)


def vqa_official_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """One question as the official VQA evaluator scores it (fraction, 0..1)."""
    gts = [step2_whitespace(g) for g in gt_answers]
    pred = step2_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [vqa_process(g) for g in gts]
        pred = vqa_process(pred)
    return soft_accuracy(pred, gts)


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """One TextVQA question as the m4c evaluator scores it: prediction and every GT EvalAI-normalised, score
    of the normalised prediction among the distinct normalised GT answers (0 if it is none of them)."""
    gts = [evalai_normalize(g) for g in gt_answers]
    pred = evalai_normalize(prediction)
    if pred not in set(gts):
        return 0.0
    return soft_accuracy(pred, gts)
