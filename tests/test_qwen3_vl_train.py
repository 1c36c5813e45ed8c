"""GRACE training of a Qwen3-VL student with a Qwen3-VL teacher on tiny synth checkpoints: the training samples
(labels = the assistant spans the template produces, checked against transformers' assistant mask), the training
forward (logits and layer -2 image hidden states equal transformers'), LSQ wrapping of exactly the decoder
linears, the end-to-end CLI run (loss falls, GDKD/RCKA/IB present and finite) and the QAT export at W4 and W8
(gracevlm reads back the exact codes, transformers the baked weights, the W4 pack loads)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gracevlm.errors import CheckpointError, InputError
from gracevlm.models.training import IGNORE_INDEX

# Renders exactly as the synth template (asserted below) with {% generation %} around each assistant turn's
# content and end-of-turn text, so transformers' return_assistant_tokens_mask is an independent reference.
TAGGED_TEMPLATE = """{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
<|im_start|>assistant
{% generation -%}
{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}
<|im_end|>
{% endgeneration -%}
{%- else -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] -%}
{%- if message['role'] != 'system' and (part['type'] == 'image' or 'image' in part or 'image_url' in part) -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif 'text' in part -%}
{{ part['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif %}<|im_end|>
{% endif -%}
{% endfor -%}
"""
SIZES = [(64, 64), (96, 64), (64, 128), (80, 80)]  # (w, h): 4, 6, 8 and 9 image tokens at patch 16, merge 2


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl

    root = tmp_path_factory.mktemp("qwen3vl_train")
    synthesize_qwen3_vl(root / "student", "qwen3-vl-tiny", "bf16", seed=0, progress=False)
    synthesize_qwen3_vl(root / "teacher", "qwen3-vl-tiny", "bf16", seed=1, progress=False)
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown here?"},
            {"from": "gpt", "value": f"The cat sits on a red mat {i}."}]})
    records.append({"id": 9, "conversations": [{"from": "human", "value": "How many apples?"},
                                               {"from": "gpt", "value": "There are 3 apples."}]})
    (root / "train.json").write_text(json.dumps(records))
    return root


def _format(folder):
    from gracevlm.models.loader import load_checkpoint

    loaded = load_checkpoint(folder, dtype=torch.float32, half_lm_head=False, fuse=False)
    return loaded, loaded.family.training_format(loaded)


TWO_TURNS = {"image": "0.png", "conversations": [
    {"from": "human", "value": "Look: <image> What is it?  "}, {"from": "gpt", "value": "A cat.\n"},
    {"from": "human", "value": "How many apples?"}, {"from": "gpt", "value": " Yes, 3 apples."}]}


def test_labels_are_the_assistant_spans_the_template_produces(ws):
    from transformers import AutoTokenizer

    from gracevlm.models.qwen3_vl.train_data import record_messages
    from gracevlm.synth.qwen3_vl import CHAT_TEMPLATE

    _, fmt = _format(ws / "student")
    tok = AutoTokenizer.from_pretrained(ws / "student")
    for record in (TWO_TURNS, json.loads((ws / "train.json").read_text())[4]):
        ex = fmt.example(record)
        messages, _ = record_messages(record)
        assert tok.apply_chat_template(messages, chat_template=TAGGED_TEMPLATE, tokenize=False) == \
            tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False)
        ref = tok.apply_chat_template(messages, chat_template=TAGGED_TEMPLATE, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert ex.input_ids == list(ref["input_ids"])
        assert ex.labels == [t if m else IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"])]
    # GRACE's message building: the user text split at <image> and stripped, assistant text verbatim
    assert record_messages(TWO_TURNS)[0][0]["content"] == [{"type": "text", "text": "Look:"}, {"type": "image"},
                                                           {"type": "text", "text": "What is it?"}]
    ex = fmt.example(TWO_TURNS)
    assert ex.input_ids.count(fmt.image_marker) == 1 and ex.image == "0.png"
    supervised = fmt.tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised == "A cat.\n<|im_end|>\n Yes, 3 apples.<|im_end|>\n"


@pytest.mark.parametrize("record, match", [
    ({"image": "a.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]},
     "0 <image> placeholder"),
    ({"conversations": [{"from": "human", "value": "<image> Hi"}, {"from": "gpt", "value": "x"}]}, "1 <image>"),
    ({"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"}]}, "one path"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "no gpt message"),
    ({"conversations": [{"from": "robot", "value": "Hi"}]}, "message 0"),
])
def test_bad_records_get_specific_errors(ws, record, match):
    _, fmt = _format(ws / "student")
    with pytest.raises(InputError, match=match):
        fmt.example(record, 0)


def test_training_forward_equals_transformers(ws):
    """A padded batch (two images of different grids, one text-only row): logits at the supervised positions
    and the layer -2 hidden states at each image's tokens equal transformers' on each row alone."""
    from transformers import Qwen3VLForConditionalGeneration

    from gracevlm.train.data import ConversationDataset, load_records

    loaded, fmt = _format(ws / "student")
    ds = ConversationDataset(load_records(ws / "train.json"), fmt, ws, fmt.max_length)
    batch = ds.collate([1, 4, 2], loaded.family.image_tokens(loaded.model))
    assert batch["pixel_values"].grid_thw.tolist() == [[1, 4, 6], [1, 8, 4]]
    with torch.no_grad():
        out = loaded.family.forward_batch(loaded.model, batch, hidden_layer=-2)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(ws / "student", dtype=torch.float32).eval()
    grids = iter(batch["pixel_values"].grid_thw.tolist())
    patches = iter(batch["pixel_values"].pixel_values.split([t * h * w for t, h, w in
                                                             batch["pixel_values"].grid_thw.tolist()]))
    row_logits, image_hidden = [], []
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :n].unsqueeze(0)
        kw = {}
        if bool((ids == fmt.image_marker).any()):
            kw = {"pixel_values": next(patches), "image_grid_thw": torch.tensor([next(grids)]),
                  "mm_token_type_ids": (ids == fmt.image_marker).long()}  # as the processor returns it
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **kw)
        sel = batch["labels"][b, 1:n] != IGNORE_INDEX
        row_logits.append(ref.logits[0, :-1][sel])
        if kw:
            image_hidden.append(ref.hidden_states[-2][0][ids[0] == fmt.image_marker])
        assert len(ref.hidden_states) == loaded.config.text.num_hidden_layers + 1
    torch.testing.assert_close(out.logits, torch.cat(row_logits), rtol=1e-4, atol=1e-4)
    assert out.targets.tolist() == batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX].tolist()
    assert [h.shape[0] for h in out.image_hidden] == [6, 8]
    for ours, ref in zip(out.image_hidden, image_hidden):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_prepare_wraps_exactly_the_decoder_linears(ws):
    from transformers import Qwen3VLForConditionalGeneration

    from gracevlm.train import lsq_layers, prepare

    loaded, _ = _format(ws / "student")
    n_layers = loaded.config.text.num_hidden_layers
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
    assert prepare(loaded.model, bits=8) == 7 * n_layers
    assert sorted(lsq_layers(loaded.model)) == sorted(f"language_model.layers.{i}.{lin}" for i in range(n_layers)
                                                      for lin in linears)
    assert all(layer.bits == 8 and layer.group_size == 128 for layer in lsq_layers(loaded.model).values())
    hf = Qwen3VLForConditionalGeneration.from_pretrained(ws / "student", dtype=torch.float32)
    assert prepare(hf, bits=4) == 7 * n_layers
    assert sorted(lsq_layers(hf)) == sorted(f"model.language_model.layers.{i}.{lin}" for i in range(n_layers)
                                            for lin in linears)


def test_rcka_over_token_sets_of_different_sizes():
    from gracevlm.train import rcka_loss, rcka_loss_sets

    gen = torch.Generator().manual_seed(0)
    sizes = [6, 9, 6, 3]  # the 3-token set is below GRACE's min_tokens (4) and skipped
    student = [torch.randn(n, 64, generator=gen, requires_grad=True) for n in sizes]
    teacher = [torch.randn(n, 32, generator=gen) for n in sizes]
    loss, n_valid = rcka_loss_sets(student, teacher)
    ref = torch.stack([rcka_loss(s, t)[0] for s, t in zip(student[:3], teacher[:3])]).mean()
    assert n_valid == 3.0
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert student[3].grad is None or not bool(student[3].grad.any())
    zero, none = rcka_loss_sets(student[3:], teacher[3:])
    assert none == 0 and float(zero.detach()) == 0.0 and zero.requires_grad


def test_grace_recipe_trains_the_llm_and_merger_only(ws, tmp_path):
    from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl
    from gracevlm.train.trainer import TrainConfig, Trainer

    # the teacher may be any Qwen3-VL checkpoint, a quantized one too (it only runs forward)
    synthesize_qwen3_vl(tmp_path / "teacher-w4", "qwen3-vl-tiny", "qat", seed=2, progress=False)
    trainer = Trainer(TrainConfig(data=str(ws / "train.json"), image_folder=str(ws), model=str(ws / "student"),
                                  teacher=str(tmp_path / "teacher-w4"), out=str(tmp_path / "run"), batch_size=2,
                                  steps=1, progress=False, threads=1, export=False, plot=False, rcka_warmup=0))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("visual.")} == \
        {n for n, _ in trainer.model.visual.merger.named_parameters(prefix="visual.merger")}
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"weights", "projector", "scales"}
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    record = trainer.train_step()
    assert all(math.isfinite(record[k]) for k in ("ce", "gdkd", "rcka", "loss")) and record["rcka_valid"] == 1.0
    with pytest.raises(CheckpointError, match="quantized"):  # the student must be dense
        Trainer(TrainConfig(data=str(ws / "train.json"), model=str(tmp_path / "teacher-w4"),
                            out=str(tmp_path / "bad"), progress=False, export=False, plot=False))


def test_cli_fp_training_writes_a_dense_qwen3_vl_folder(ws, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    from gracevlm.cli import main
    from gracevlm.models.loader import load_checkpoint

    out = tmp_path / "fp"
    assert main(["train", "--data", str(ws / "train.json"), "--image-folder", str(ws), "--model", str(ws / "student"),
                 "--out", str(out), "--method", "fp", "--steps", "1", "--batch-size", "2", "--no-progress",
                 "--no-plot", "--threads", "1"]) == 0
    assert load_checkpoint(out / "model").stats.format == "qwen3-vl"
    assert "qat" not in json.loads((out / "model" / "config.json").read_text())
    hf = Qwen3VLForConditionalGeneration.from_pretrained(out / "model")
    assert hf.dtype == torch.bfloat16


def _cli_train(ws, out, bits, steps, lr):
    from gracevlm.cli import main

    argv = ["train", "--data", str(ws / "train.json"), "--image-folder", str(ws), "--model", str(ws / "student"),
            "--teacher", str(ws / "teacher"), "--out", str(out), "--method", "grace", "--bits", str(bits),
            "--steps", str(steps), "--batch-size", "2", "--lr", str(lr), "--scale-lr", "1e-3",
            "--schedule", "constant", "--warmup-ratio", "0", "--rcka-warmup", "1", "--no-progress", "--no-plot",
            "--threads", "1", "--save-every", "0", "--json"]
    assert main(argv) == 0
    from gracevlm.train.plot import read_log

    return read_log(out / "log.jsonl")


def _trained_codes(out: Path, bits: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Codes and fp32 scales of every quantized layer, recomputed from the final training state (fp32 latent
    weights and log-scales) with GRACE's formula: q = clamp(round(W / exp(log_scale)), qmin, qmax)."""
    state = torch.load(next((out / "checkpoints").glob("step-*")) / "trainer_state.pt", weights_only=True)["model"]
    qmax = 2 ** (bits - 1) - 1
    codes = {}
    for key, log_scale in state.items():
        if not key.endswith(".log_scale"):
            continue
        name = key[: -len(".log_scale")]
        w = state[name + ".weight"].to(torch.float32)
        s = torch.exp(log_scale.to(torch.float32)).view(w.shape[0], -1)
        q = torch.round(w.view(w.shape[0], s.shape[1], -1) / s.unsqueeze(-1)).clamp(-qmax - 1, qmax)
        codes[name] = (q.view_as(w).to(torch.int8), s)
    return codes


def _loaded_codes(layer, bits: int) -> torch.Tensor:
    if bits == 8:
        return layer.to_codes().qweight
    from gracevlm.formats.awq import unpack_awq

    awq = layer.to_awq()
    u, z = unpack_awq(awq.qweight, awq.qzeros)  # [in, out], [in/g, out]
    return (u - z.repeat_interleave(layer.group_size, 0)).t().to(torch.int8)


@pytest.mark.parametrize("bits", [4, 8])
def test_cli_grace_end_to_end_and_qat_export(ws, tmp_path, bits):
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration

    from gracevlm.engine.vlm import load
    from gracevlm.models.loader import load_checkpoint

    steps = 20 if bits == 4 else 3
    log = _cli_train(ws, tmp_path / "run", bits, steps, lr=3e-3)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("ce", "gdkd", "rcka", "beta", "loss")), r
        assert r["rcka_valid"] == 1.0 and r["gdkd"] > 0.0
        assert r["loss"] == pytest.approx(r["ce"] + r["beta"] * r["gdkd"] + r["omega"] * r["rcka"], rel=1e-4)
    assert log[-1]["beta"] != log[0]["beta"]  # the IB controller moves beta every step
    if bits == 4:  # a 5-sample overfit set: the CE falls steadily
        first, last = sum(r["ce"] for r in log[:4]), sum(r["ce"] for r in log[-4:])
        assert last < 0.5 * first, (first, last)

    qat = tmp_path / "run" / "qat"
    cfg = json.loads((qat / "config.json").read_text())
    assert cfg["qat"]["bits"] == bits and cfg["qat"]["group_size"] == 128 and cfg["qat"]["num_replaced"] == 14
    assert cfg["qat"] == {"bits": bits, "group_size": 128, "skip_keywords": ["visual", "merger", "lm_head",
                                                                          "embed_tokens"], "num_replaced": 14}
    trained = _trained_codes(tmp_path / "run", bits)
    stored = load_file(str(qat / "model.safetensors"))
    sidecar = torch.load(qat / "qat_quantized_weights.bin", weights_only=True)
    assert "lm_head.weight" not in stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    assert stored["model.visual.patch_embed.proj.weight"].shape == (64, 3, 2, 16, 16)  # the Conv3d shape
    assert sorted(k[: -len(".log_scale")] for k in sidecar if k.endswith(".log_scale")) == \
        sorted("model." + n for n in trained)

    ours = load_checkpoint(qat, dtype=torch.float32, fuse=False)  # GRACE QAT: codes recovered from the baked weights
    assert ours.stats.format == "grace-qat"
    hf = Qwen3VLForConditionalGeneration.from_pretrained(qat, dtype=torch.bfloat16).state_dict()
    for name, (q, s) in trained.items():
        assert torch.equal(_loaded_codes(ours.model.get_submodule(name), bits), q), name
        baked = (q.to(torch.float32) * s.repeat_interleave(128, 1)).to(torch.bfloat16)
        assert torch.equal(hf["model." + name + ".weight"], baked), name
        assert torch.equal(sidecar["model." + name + ".weight"], baked), name
    for key in ("model.visual.merger.linear_fc1.weight", "model.language_model.embed_tokens.weight"):
        assert torch.equal(hf[key], stored[key]), key

    image = str(ws / "0.png")
    text = load(qat, device="cpu").generate("What is shown here?", images=[image], max_new_tokens=4)
    assert len(text.token_ids) >= 1
    if bits == 4:  # the trainer's pack (= gracevlm pack) gives the GRACE AWQ folder: same codes, same tokens
        awq = tmp_path / "run" / "awq"
        assert json.loads((awq / "config.json").read_text())["awq_packing"]["zero_point"] == 8
        packed = load_checkpoint(awq, dtype=torch.float32, fuse=False)
        assert packed.stats.format == "grace-awq"
        for name, (q, _) in trained.items():
            assert torch.equal(_loaded_codes(packed.model.get_submodule(name), 4), q), name
        again = load(awq, device="cpu").generate("What is shown here?", images=[image], max_new_tokens=4)
        assert again.token_ids == text.token_ids
        from gracevlm.cli import main

        assert main(["pack", "--qat", str(qat), "--out", str(tmp_path / "packed")]) == 0  # `gracevlm pack` itself
        mine = load_file(str(awq / "model.safetensors"))
        theirs = load_file(str(tmp_path / "packed" / "model.safetensors"))
        assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    else:
        assert not (tmp_path / "run" / "awq").exists()  # the AWQ GEMM layout is 4-bit only
