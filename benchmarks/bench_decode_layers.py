"""Decode steps with all layers in one native call (``models.decode_stack``) against the layer-by-layer path, in
the same process, alternating rounds; also checks that both give bitwise the same logits and KV.

    PYTHONPATH=src python benchmarks/bench_decode_layers.py --model /path/to/checkpoint [--steps 16] [--rounds 2]
    PYTHONPATH=src python benchmarks/bench_decode_layers.py --model M --row-orders   # the INT4 M = 1 row orders

Each round: a fresh cache, a 64-token random prompt, ``--steps`` greedy decode steps, once per path. Prints the
median step of each path per round and the ratio. ``--row-orders`` instead compares, on the one-call path, the
INT4 kernel's M = 1 loop over four adjacent weight rows with its default over four rows from the four quarters
of a task (``gv_set_multi_row`` 1 and 2), alternating which goes first.
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


def compare_row_orders(vlm, ids: list[int], steps: int, rounds: int) -> None:
    from gracevlm.kernels import native

    lib = native.load_library()
    if lib is None:
        raise SystemExit(f"the native INT4 library is not available: {native.load_error()}")
    names = {1: "adjacent rows", 2: "quarter streams"}
    old = lib.gv_set_multi_row(2)
    try:
        for r in range(rounds):
            res = {}
            for mode in ((1, 2) if r % 2 == 0 else (2, 1)):
                lib.gv_set_multi_row(mode)
                res[mode] = decode_round(vlm, ids, steps, one_call=True)
            same = torch.equal(res[1][0], res[2][0]) and torch.equal(res[1][1], res[2][1])
            print(f"round {r + 1}: {names[1]} {res[1][2] * 1e3:.1f} ms/step, {names[2]} {res[2][2] * 1e3:.1f} ms/step "
                  f"({res[2][2] / res[1][2]:.2f}x; logits and KV bitwise equal: {same})", flush=True)
    finally:
        lib.gv_set_multi_row(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--row-orders", action="store_true", help="A/B the INT4 M = 1 row orders instead")
    args = ap.parse_args()
    import gracevlm
    from gracevlm.models import decode_stack

    vlm = gracevlm.load(args.model, device="cpu", prefix_cache_gib=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (64,), generator=gen).tolist()
    if args.row_orders:
        compare_row_orders(vlm, ids, args.steps, args.rounds)
        return
    for r in range(args.rounds):
        layered = decode_round(vlm, ids, args.steps, one_call=False)
        stacked = decode_round(vlm, ids, args.steps, one_call=True)
        used = decode_stack.in_use(vlm.model.language_model)
        same = torch.equal(layered[0], stacked[0]) and torch.equal(layered[1], stacked[1])
        print(f"round {r + 1}: layer by layer {layered[2] * 1e3:.1f} ms/step, one call {stacked[2] * 1e3:.1f} ms/step "
              f"({stacked[2] / layered[2]:.2f}x; one call in use: {used}; logits and KV bitwise equal: {same})")


if __name__ == "__main__":
    main()
