"""EvalAI / VQA answer normalisation and soft accuracy, each rule on hand-made cases (eval-protocol.md 2)."""
import pytest

from gracevlm.eval.normalize import (CONTRACTIONS, PERIOD_DELETION_LIMIT, evalai_normalize, soft_accuracy,
                                     step1_word_tokenize, step2_whitespace, step3_punctuation, step4_periods,
                                     step5_digits_articles, textvqa_accuracy, vqa_official_accuracy, vqa_process)


# -- step 1 ---------------------------------------------------------------------------------------------------
def test_step1_lowercase_comma_question_and_possessive():
    # lower -> "what's it, man's?" ; delete , ? -> "what's it man's" ; 's -> " 's" ; strip
    assert step1_word_tokenize("  What's IT, Man's?  ") == "what 's it man 's"
    assert step1_word_tokenize("1,000") == "1000"


# -- step 2 ---------------------------------------------------------------------------------------------------
def test_step2_newlines_tabs_strip():
    assert step2_whitespace(" a\tb\nc \n") == "a b c"


# -- step 3 ---------------------------------------------------------------------------------------------------
def test_step3_replace_when_not_next_to_space():
    assert step3_punctuation("t-shirt") == "t shirt"
    assert step3_punctuation("a/b") == "a b"


def test_step3_delete_when_next_to_space():
    assert step3_punctuation("red - blue") == "red  blue"
    assert step3_punctuation("(yes)") == " yes "  # neither "(" nor ")" touches a space -> spaces
    assert step3_punctuation("yes !") == "yes "


def test_step3_looks_at_the_string_as_entered():
    # '/' (visited before '-') touches no space in "x-y/-z" -> becomes a space: "x-y -z".
    # '-' is then tested on the ENTERED string "x-y/-z" (no "- " or " -"), so every '-' becomes a space:
    # "x y  z". Testing the edited string "x-y -z" would delete both '-' and give "xy z".
    assert step3_punctuation("x-y/-z") == "x y  z"
    assert evalai_normalize("x-y/-z") == "x y z"


def test_step3_digit_comma_digit_deletes_every_punctuation():
    # the VQA evaluator has no step 1, so the comma survives and the digit,digit test fires: delete all
    assert step3_punctuation("1,000-2,000") == "10002000"
    assert vqa_process("1,000-2,000") == "10002000"
    # m4c: step 1 removed the commas first, so '-' becomes a space
    assert evalai_normalize("1,000-2,000") == "1000 2000"


# -- step 4 ---------------------------------------------------------------------------------------------------
def test_step4_periods_not_before_digit():
    assert step4_periods("u.s.") == "us"
    assert step4_periods("3.5") == "3.5"
    assert step4_periods("1.5.") == "1.5"


def test_step4_stops_after_32_deletions():
    assert PERIOD_DELETION_LIMIT == 32
    text = "a." * 40
    out = step4_periods(text)
    # first 32 periods go: 32 'a' glued to the 33rd 'a', then 7 x ".a" and the final "."
    assert out == "a" * 33 + ".a" * 7 + "."
    assert out.count(".") == 8


# -- step 5 ---------------------------------------------------------------------------------------------------
def test_step5_number_words_and_articles():
    assert step5_digits_articles("The one dog") == "1 dog"
    assert step5_digits_articles("none") == "0"
    assert step5_digits_articles("zero an ten a eleven") == "0 10 eleven"


def test_step5_contractions_lowercase_keys_only():
    assert step5_digits_articles("dont") == "don't"
    assert step5_digits_articles("isnt youre oclock") == "isn't you're o'clock"
    assert step5_digits_articles("somebody'd") == "somebodyd"    # the table's one reversed entry
    # keys with capitals never match: tokens are lower-cased first
    assert "Im" in CONTRACTIONS and step5_digits_articles("Im") == "im"
    assert step5_digits_articles("Ive") == "ive"


def test_evalai_full_pipeline():
    assert evalai_normalize("Two dogs.") == "2 dogs"
    assert evalai_normalize("The man's T-Shirt") == "man 's t shirt"
    assert evalai_normalize("Yes\n") == "yes"
    assert evalai_normalize("A dont") == "don't"


# -- soft accuracy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_match,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_levels(n_match, expected):
    # n annotators say "yes": each of them sees n-1 others, each of the others sees n.
    # n=3: (3 * 2/3 + 7 * 1) / 10 = 0.9 ; n=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6 ; n=1: (0 + 9 * 1/3) / 10 = 0.3
    gts = ["yes"] * n_match + ["no"] * (10 - n_match)
    assert soft_accuracy("yes", gts) == pytest.approx(expected)


def test_vqa_official_unanimous_gt_compares_raw():
    gts = ["t-shirt"] * 10
    assert vqa_official_accuracy("t-shirt", gts) == 1.0
    assert vqa_official_accuracy("t shirt", gts) == 0.0      # LLaVA's normalised submission loses credit
    assert vqa_official_accuracy(" t-shirt\n", gts) == 1.0   # step 2 always runs
    assert vqa_official_accuracy("T-Shirt", gts) == 0.0


def test_vqa_official_non_unanimous_normalises_both():
    gts = ["t-shirt"] * 9 + ["shirt"]
    # GT -> "t shirt" x9, "shirt"; prediction "T-Shirt" -> "t shirt": 9 matches -> 1.0
    assert vqa_official_accuracy("T-Shirt", gts) == 1.0
    assert vqa_official_accuracy("shirt", gts) == pytest.approx(0.3)


def test_textvqa_accuracy_normalises_pred_and_gt():
    gts = ["coca cola"] * 2 + ["Coca-Cola"] * 2 + ["pepsi"] * 6
    # normalised GT: "coca cola" x4, "pepsi" x6; "COCA-COLA." -> "coca cola": 4 matches -> 1.0
    assert textvqa_accuracy("COCA-COLA.", gts) == 1.0
    # "Pepsi" -> 6 matches -> 1.0 ; "cola" -> not a GT answer -> 0
    assert textvqa_accuracy("Pepsi", gts) == 1.0
    assert textvqa_accuracy("cola", gts) == 0.0
