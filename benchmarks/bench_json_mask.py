"""Cost of one uncached JSON-grammar mask (``response_format: json_object``) over a vocabulary (printed,
never asserted).

LLaMA's 32k tokenizer is not on this machine, so the vocabulary is synthetic: ``--vocab`` random pieces of
1-8 characters (letters, space, JSON punctuation, digits), half with SentencePiece's "▁". For a few grammar
states it prints the allowed-token count and the milliseconds of the first (uncached) mask.

Usage: PYTHONPATH=src python benchmarks/bench_json_mask.py [--vocab 32000] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import string
import time

from gracevlm.engine.json_grammar import START, JsonObjectConstraint, feed


class SyntheticTokenizer:
    eos_id, special_ids = 2, frozenset({0, 1, 2})

    def __init__(self, size: int, seed: int):
        rng = random.Random(seed)
        alphabet = string.ascii_letters + ' {}[]":,0123456789.-'
        self.vocab_size = size
        self.pieces = ["\u2581" * (rng.random() < 0.5) + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                       for _ in range(size)]

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = SyntheticTokenizer(args.vocab, args.seed)
    constraint = JsonObjectConstraint(tok, args.vocab)
    for text in ["", "{", '{"ab', '{"ab":', '{"ab": 12', '{"ab": [1, {"c": "x']:
        constraint.state = feed(START, text)
        t0 = time.perf_counter()
        allowed = int(constraint.allowed().sum())
        print(f"{text!r:24} allowed {allowed:6d}  first mask {1000 * (time.perf_counter() - t0):7.1f} ms")


if __name__ == "__main__":
    main()
