"""Decode steps with all layers in one native call (``models.decode_stack``) against the layer-by-layer path, in
the same process, alternating rounds; also checks that both give bitwise the same logits and KV.

    PYTHONPATH=src python benchmarks/bench_decode_layers.py --model /path/to/checkpoint [--steps 16] [--rounds 2]

Each round: a fresh cache, a 64-token random prompt, ``--steps`` greedy decode steps, once per path. Prints the
median step of each path per round and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def decode_round(vlm, ids: list[int], steps: int, one_call: bool):
    from gracevlm.kernels import decode_layers

    model = vlm.model
    old = decode_layers.set_enabled(one_call)
    try:
        with torch.inference_mode():
            cache = model.new_cache(1, len(ids) + steps + 8)
            prompt = model.prompt_for(ids, None)
            model.forward_prompt(prompt, cache, 0)
            tok, logits, times = torch.tensor([5]), [], []
            for i in range(steps):
                t = time.perf_counter()
                out = model.forward_decode(tok, torch.tensor([len(ids) + i]), [prompt.decode_offset], cache,
                                           torch.tensor([0]))
                times.append(time.perf_counter() - t)
                tok = out.argmax(-1)
                logits.append(out.clone())
            return torch.stack(logits), cache.slot_store(0).clone(), statistics.median(times[2:])
    finally:
        decode_layers.set_enabled(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import gracevlm
    from gracevlm.models import decode_stack

    vlm = gracevlm.load(args.model, device="cpu", prefix_cache_gib=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (64,), generator=gen).tolist()
    for r in range(args.rounds):
        layered = decode_round(vlm, ids, args.steps, one_call=False)
        stacked = decode_round(vlm, ids, args.steps, one_call=True)
        used = decode_stack.in_use(vlm.model.language_model)
        same = torch.equal(layered[0], stacked[0]) and torch.equal(layered[1], stacked[1])
        print(f"round {r + 1}: layer by layer {layered[2] * 1e3:.1f} ms/step, one call {stacked[2] * 1e3:.1f} ms/step "
              f"({stacked[2] / layered[2]:.2f}x; one call in use: {used}; logits and KV bitwise equal: {same})")


if __name__ == "__main__":
    main()
