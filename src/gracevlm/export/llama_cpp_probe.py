"""Run a GGUF export in llama.cpp (llama-cpp-python + its mtmd bindings) on given prompt ids and print JSON.

``python -m gracevlm.export.llama_cpp_probe SPEC.json``, run in a subprocess by ``export.check`` (a crash in
native code must not take the caller down). SPEC: ``model``, ``mmproj`` ("" for text only), ``before`` /
``after`` (prompt ids around the image), ``image`` (a file), ``n`` (new tokens), ``forced`` (token ids).
Prints one JSON line: ``greedy`` (llama.cpp's own greedy tokens, EOS excluded), ``forced_argmax`` and
``forced_gap`` (fed ``forced`` one by one, llama.cpp's argmax at each step and ``logit[argmax] -
logit[forced token]``), ``n_image_tokens`` and ``tokenize`` (llama.cpp's tokenization of ``probe_text``);
with ``logits_out`` the teacher-forced logit rows are saved there (``.npy``, float32 [steps, vocab]); with
``embd_out`` and an image, mtmd's image embeddings (``mtmd_encode_chunk``, float32 [tokens, n_embd]).

Prompt ids go in directly (llama.cpp's own template and tokenizer are checked separately through
``tokenize``); the image goes through mtmd's preprocessing and the mmproj. No AMX / repacked weight buffers
(``use_extra_bufts`` off): some sandboxes trap AMX tiles.
"""
from __future__ import annotations

import ctypes
import json
import sys


def _open(spec):
    import llama_cpp
    import llama_cpp.llama as L

    default_params = llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    L.llama_cpp.llama_model_default_params = params
    return llama_cpp.Llama(model_path=spec["model"], n_ctx=spec.get("n_ctx", 2048), verbose=False,
                           n_threads=spec.get("threads", 1), logits_all=True)


def _image_chunk(spec, llm):
    import llama_cpp.mtmd_cpp as M

    p = M.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.print_timings = False, spec.get("threads", 1), False
    ctx = M.mtmd_init_from_file(spec["mmproj"].encode(), llm.model, p)
    if not ctx:
        raise SystemExit(f"mtmd could not load {spec['mmproj']}")
    data = open(spec["image"], "rb").read()
    bmp = M.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data)),
                                             len(data), False)
    text = M.mtmd_input_text()
    marker = M.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    chunks = M.mtmd_input_chunks_init()
    if M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
    for i in range(M.mtmd_input_chunks_size(chunks)):
        ch = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return ctx, ch
    raise SystemExit("mtmd produced no image chunk")


def _save_embeddings(path: str, llm, image) -> None:
    import numpy as np
    import llama_cpp.mtmd_cpp as M

    ctx, ch = image
    n = M.mtmd_input_chunk_get_n_tokens(ch)
    if M.mtmd_encode_chunk(ctx, ch) != 0:
        raise SystemExit("mtmd could not encode the image")
    d = llm.n_embd()
    np.save(path, np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * d,)).reshape(n, d).copy())


def _prefill(spec, llm, image) -> int:
    """Evaluate before + image + after from an empty context; returns the image's token count."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as M

    llm.reset()
    llm.eval(spec["before"])
    n_image = 0
    if image is not None:
        ctx, ch = image
        n_image = M.mtmd_input_chunk_get_n_tokens(ch)
        past = llama_cpp.llama_pos(0)
        if M.mtmd_helper_eval_chunk_single(ctx, llm._ctx.ctx, ch, llama_cpp.llama_pos(llm.n_tokens),
                                           llama_cpp.llama_seq_id(0), llm.n_batch, False, ctypes.byref(past)):
            raise SystemExit("mtmd could not evaluate the image")
        llm.n_tokens = past.value
    if spec["after"]:
        llm.eval(spec["after"])
    return n_image


def main(path: str) -> None:
    import numpy as np

    spec = json.loads(open(path, encoding="utf-8").read())
    llm = _open(spec)
    image = _image_chunk(spec, llm) if spec.get("mmproj") else None
    if image is not None and spec.get("embd_out"):
        _save_embeddings(spec["embd_out"], llm, image)
    n_image = _prefill(spec, llm, image)
    greedy = []
    for _ in range(spec["n"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok == llm.token_eos():
            break
        greedy.append(tok)
        llm.eval([tok])
    _prefill(spec, llm, image)
    argmax, gap, rows = [], [], []
    for tok in spec["forced"]:
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        best = int(np.argmax(row))
        argmax.append(best)
        gap.append(float(row[best] - row[tok]))
        rows.append(row)
        llm.eval([tok])
    if spec.get("logits_out"):
        np.save(spec["logits_out"], np.stack(rows) if rows else np.zeros((0, llm.n_vocab()), np.float32))
    print(json.dumps({"greedy": greedy, "forced_argmax": argmax, "forced_gap": gap, "n_image_tokens": n_image,
                      "tokenize": llm.tokenize(spec.get("probe_text", "").encode(), add_bos=True)}))


if __name__ == "__main__":
    main(sys.argv[1])
