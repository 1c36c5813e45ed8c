"""Built-in text corpus for training the tiny SentencePiece tokenizers of synthetic checkpoints.

The corpus is a few thousand short lines built from the word lists below by a fixed 32-bit LCG, so it
is identical on every machine and Python version (``random`` makes no such promise for ``choice``).
It covers what LLaVA-1.5 prompts contain: the two system prompts, the ``USER:``/``ASSISTANT:`` roles,
the short-answer and multiple-choice instructions, VQA-style questions and answers, digits, punctuation
and a few non-ASCII words (accents, CJK, emoji). Lines hold no newline. Newlines in prompts are encoded
with the byte piece ``<0x0A>``, as in LLaMA.
"""

from __future__ import annotations

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."

COLOURS = ("red green blue yellow orange purple pink brown black white gray grey gold silver beige navy "
           "teal maroon").split()
SHAPES = "circle square triangle rectangle oval star heart diamond cube sphere cone cylinder".split()
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve twenty thirty hundred "
                "thousand first second third last").split()
NOUNS = ("man woman person people boy girl child baby dog cat horse cow sheep bird elephant giraffe zebra bear "
         "car bus truck train bike bicycle motorcycle boat plane airplane street road sign light building house "
         "window door roof wall table chair couch bed desk computer laptop phone keyboard mouse screen book "
         "bottle cup glass bowl plate fork knife spoon pizza sandwich cake banana apple orange donut food "
         "shirt hat jacket umbrella bag ball frisbee kite skateboard surfboard skis snow water beach ocean "
         "sky cloud tree grass field park mountain river city kitchen room bathroom toilet sink clock vase "
         "picture image photo sign text word letter number player game team man's woman's animal fence "
         "flower plant grass sand wave rock hill bridge tower shelf lamp mirror towel pillow blanket").split()
ADJECTIVES = ("big small large little tall short long old new young happy sad open closed empty full wet dry "
              "hot cold bright dark clean dirty wooden metal plastic round flat striped sunny cloudy busy "
              "quiet").split()
VERBS = ("is are was has have holds holding sits sitting stands standing walks walking runs running eats "
         "eating plays playing rides riding looks looking wears wearing carries carrying flies flying "
         "drives driving reads reading shows showing").split()
PLACES = ("on the table|in the kitchen|on the street|in the sky|at the beach|in the park|on the left|"
          "on the right|in the background|in the foreground|near the window|under the tree|behind the car|"
          "next to the dog|in the water|on the wall").split("|")
QUESTIONS = (
    "What color is the {noun}?", "What is the {noun} doing?", "How many {noun}s are there?",
    "Is there a {noun} in the image?", "Is the {noun} {adjective}?", "What is on the {noun}?",
    "Where is the {noun}?", "What shape is the {noun}?", "What is the man holding?",
    "Which animal is shown?", "Is this photo taken indoors?", "What does the sign say?",
    "What time is it?", "What is the brand of the {noun}?", "Are the {noun}s {colour}?",
    "What number is on the {noun}?", "Describe the image in detail.", "What is unusual about this image?",
    "Please answer yes or no.", "What is written on the {noun}?",
)
ANSWERS = ("Yes.|No.|yes|no|{colour}|{number}|{noun}|The {noun} is {colour}.|There are {number} {noun}s.|"
           "A {adjective} {noun} {verb} {place}.|The {noun} {verb} {place}.|It is a {shape}.|"
           "The answer is {letter}.|{letter}|{digits}|It is {digits}:{digits2}.").split("|")
OPTION_LINES = ("A. {colour}|B. {noun}|C. {number}|D. {shape}|(A) {noun}|(B) {colour}|Options: A. yes B. no|"
                "Hint: The {noun} is {place}.|Question: Which {noun} is {colour}?|Context: {text}").split("|")
NON_ASCII = ("café naïve résumé façade jalapeño crème brûlée Zürich São Paulo Ελλάδα Москва 日本語 日本 中文 "
             "東京 こんにちは 한국어 😀 🙂 🐶 🚗 ❤️ ☀️ 👍 —– … “quoted” ‘single’ € £ ¥ ° ± × ÷").split()
PUNCTUATION = list(".,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|")
FREE_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "USER: What is shown in this picture? ASSISTANT: A {adjective} {noun} {verb} {place}.",
    "USER: {question} ASSISTANT: {answer}",
    "ASSISTANT: {answer}",
    "USER: {question}",
    "Question: {question} Answer: {answer}",
    "{question} {short}",
    "{question} {mc}",
)


class _Lcg:
    """Numerical Recipes 32-bit linear congruential generator (stable everywhere, unlike random)."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFF

    def below(self, n: int) -> int:
        self.state = (1664525 * self.state + 1013904223) & 0xFFFFFFFF
        return (self.state >> 8) % n

    def pick(self, items):
        return items[self.below(len(items))]


def _fill(template: str, rng: _Lcg) -> str:
    values = {
        "noun": rng.pick(NOUNS), "adjective": rng.pick(ADJECTIVES), "colour": rng.pick(COLOURS),
        "shape": rng.pick(SHAPES), "number": rng.pick(NUMBER_WORDS), "verb": rng.pick(VERBS),
        "place": rng.pick(PLACES), "letter": rng.pick("ABCD"), "digits": str(rng.below(1000)),
        "digits2": f"{rng.below(60):02d}", "short": SHORT_ANSWER, "mc": MULTIPLE_CHOICE,
        "text": " ".join(rng.pick(NON_ASCII) for _ in range(2)),
    }
    if "{question}" in template:
        values["question"] = _fill(rng.pick(QUESTIONS), rng)
    if "{answer}" in template:
        values["answer"] = _fill(rng.pick(ANSWERS), rng)
    return template.format(**values)


def default_corpus(n_lines: int = 3000, seed: int = 20240101) -> list[str]:
    """Deterministic list of ``n_lines`` training lines (same output for the same arguments)."""
    rng = _Lcg(seed)
    lines = [SYSTEM_VICUNA, SYSTEM_LLAVA, SHORT_ANSWER, MULTIPLE_CHOICE, "USER:", "ASSISTANT:",
             " ".join(NON_ASCII), " ".join(PUNCTUATION), " ".join(NUMBER_WORDS), "0 1 2 3 4 5 6 7 8 9"]
    makers = (
        lambda: f"{SYSTEM_VICUNA} USER: {_fill(rng.pick(QUESTIONS), rng)} ASSISTANT:",
        lambda: f"{SYSTEM_LLAVA} USER: {_fill(rng.pick(QUESTIONS), rng)} ASSISTANT:",
        lambda: _fill(rng.pick(QUESTIONS), rng),
        lambda: _fill(rng.pick(QUESTIONS), rng) + " " + SHORT_ANSWER,
        lambda: _fill(rng.pick(QUESTIONS), rng) + " " + MULTIPLE_CHOICE,
        lambda: _fill(rng.pick(ANSWERS), rng),
        lambda: _fill(rng.pick(OPTION_LINES), rng),
        lambda: _fill(rng.pick(FREE_TEXT), rng),
        lambda: " ".join(_fill("{adjective} {colour} {noun}", rng) for _ in range(1 + rng.below(4))),
        lambda: f"{rng.pick(NON_ASCII)} {rng.pick(NOUNS)} {rng.pick(NON_ASCII)}{rng.pick(PUNCTUATION)}",
        lambda: f"{rng.below(100000)} {rng.pick(NOUNS)}s, {rng.below(10)}.{rng.below(100)} {rng.pick(PUNCTUATION)}",
    )
    while len(lines) < n_lines:
        lines.append(makers[rng.below(len(makers))]())
    return lines[:n_lines]
