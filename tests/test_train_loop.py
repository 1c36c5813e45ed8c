"""The training loop on a tiny LLaVA: loss goes down, exact resume, 2-process data parallel, exports, CLI."""
import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gracevlm.demo.model_def import DemoArch
from gracevlm.demo.recipe import RecipeConfig, prepare_workspace
from gracevlm.train.plot import read_log
from gracevlm.train.trainer import TrainConfig, Trainer, train

TINY = DemoArch(hidden=128, intermediate=256, layers=2, heads=2, vocab=320, max_positions=256, vision_hidden=128,
                vision_intermediate=256, vision_layers=2, vision_heads=2, image_size=32, patch_size=16)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cfg = RecipeConfig(work=str(work), n_train=16, n_heldout=2, arch=TINY, tokenizer_vocab=320, tokenizer_lines=16)
    paths = prepare_workspace(cfg)
    return paths


def _cfg(paths, out, **kw):
    base = dict(data=str(paths["data"] / "train.json"), image_folder=str(paths["data"]), model=str(paths["init"]),
                out=str(out), method="grace", batch_size=2, grad_accum=2, lr=1e-3, scale_lr=1e-3, progress=False,
                threads=1, rcka_warmup=2, warmup_ratio=0.0, export=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss(workspace, tmp_path):
    trainer = Trainer(_cfg(workspace, tmp_path / "run", method="qat", steps=12, schedule="constant", lr=3e-3,
                           batch_size=4, grad_accum=1))
    first = [trainer.train_step()["ce"] for _ in range(4)]
    for _ in range(4):
        trainer.train_step()
    last = [trainer.train_step()["ce"] for _ in range(4)]
    assert sum(last) < 0.7 * sum(first)


def test_grace_step_uses_all_terms(workspace, tmp_path):
    trainer = Trainer(_cfg(workspace, tmp_path / "run", steps=3))
    recs = [trainer.train_step() for _ in range(3)]
    assert recs[0]["omega"] == 0.0 and recs[1]["omega"] == pytest.approx(1.5) and recs[2]["omega"] == 3.0
    assert recs[0]["beta"] == 0.5 and trainer.controller.steps == 3
    assert all(r["rcka_valid"] == 1.0 and r["gdkd"] >= 0.0 for r in recs)
    assert recs[2]["loss"] == pytest.approx(recs[2]["ce"] + recs[2]["beta"] * recs[2]["gdkd"]
                                            + 3.0 * recs[2]["rcka"], rel=1e-4)
    assert trainer.teacher is not None and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert not any(p.requires_grad for p in trainer.model.vision_tower.parameters())


def _strip_times(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_reproduces_uninterrupted_run_bit_for_bit(workspace, tmp_path):
    full = train(_cfg(workspace, tmp_path / "full", steps=4, save_every=2))
    assert full["finished"]
    part = train(_cfg(workspace, tmp_path / "split", steps=4, save_every=2, stop_after=2, plot=True))
    assert not part["finished"] and part["steps"] == 2
    resumed = train(_cfg(workspace, tmp_path / "split", steps=4, save_every=2, resume="auto"))
    assert resumed["finished"] and resumed["steps"] == 4
    assert resumed["digest"] == full["digest"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["controller"] == b["controller"]
    assert _strip_times(read_log(tmp_path / "full" / "log.jsonl")) == \
        _strip_times(read_log(tmp_path / "split" / "log.jsonl"))
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000


def test_resume_refuses_a_different_data_order(workspace, tmp_path):
    train(_cfg(workspace, tmp_path / "r", steps=2, stop_after=1))
    from gracevlm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="seed"):
        Trainer(_cfg(workspace, tmp_path / "r", steps=2, resume="auto", seed=1))


def test_export_writes_qat_and_packed_folders(workspace, tmp_path):
    from gracevlm.engine.vlm import load
    from gracevlm.models.inspect import inspect_checkpoint

    summary = train(_cfg(workspace, tmp_path / "run", steps=1, export=True))
    assert summary["pack"]["layers"] == 14 and summary["pack"]["max_code_error"] == 0
    info = inspect_checkpoint(summary["awq"])
    assert info["format"] == "grace-awq" and info["checks"]["qzeros_all_0x88888888"]
    cfg = json.loads((Path(summary["qat"]) / "config.json").read_text())
    assert cfg["qat"]["group_size"] == 128 and cfg["qat"]["num_replaced"] == 14
    out = load(summary["awq"], device="cpu").generate("How many objects are there?", images=[
        str(workspace["data"] / "train" / "000000.png")], max_new_tokens=3)
    assert out.finish_reason in ("stop", "length")


def test_cli_register_and_run(workspace, tmp_path):
    from gracevlm.train.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", str(workspace["data"] / "train.json"), "--image-folder",
                              str(workspace["data"]), "--model", str(workspace["init"]), "--out",
                              str(tmp_path / "cli"), "--method", "fp", "--steps", "1", "--batch-size", "2",
                              "--no-progress", "--threads", "1", "--json"])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "model" / "config.json").is_file()
    assert (tmp_path / "cli" / "log.jsonl").is_file()


@pytest.mark.slow
def test_two_process_gloo_ranks_stay_identical(workspace, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "gracevlm.train.cli",
           "--data", str(workspace["data"] / "train.json"), "--image-folder", str(workspace["data"]),
           "--model", str(workspace["init"]), "--out", str(out), "--method", "grace", "--steps", "2",
           "--batch-size", "2", "--no-progress", "--threads", "1", "--no-export", "--no-plot", "--rcka-warmup", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GRACEVLM_DIST_BACKEND="gloo")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["identical"] and len(set(ranks["sha256"])) == 1
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and log[0]["tokens"] > 0


def test_fp16_checkpoint_trains_in_fp32(workspace, tmp_path):
    """Release checkpoints are fp16 (the loader even keeps embed_tokens in the file dtype): the trainer must
    hold fp32 master weights, or AdamW's epsilon underflows and parameters turn into NaN."""
    from gracevlm.models.loader import load_checkpoint
    from gracevlm.train import save_dense_checkpoint

    fp16 = tmp_path / "fp16"
    save_dense_checkpoint(load_checkpoint(workspace["init"], fuse=False).model, fp16,
                          json.loads((workspace["init"] / "config.json").read_text()), workspace["init"],
                          torch.float16)
    trainer = Trainer(_cfg(workspace, tmp_path / "run", model=str(fp16), steps=3))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    recs = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_forward_train_matches_cached_inference_forward():
    """The cache-free training forward and the KV-cache inference forward give the same logits, and
    hidden_states[-2] is the output of the second-to-last layer."""
    from gracevlm.models.llama import KVCache, LlamaForCausalLM, LlamaSpec

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaSpec(128, 256, 3, 2, 2, 100)).eval()
    emb = torch.randn(2, 9, 128)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        hidden, states = lm.forward_train(emb, mask, output_hidden_states=True)
        ref = lm(emb, torch.arange(9).expand(2, 9), KVCache(lm.spec, 2, 9, torch.float32), logits_for="all")
        x = emb
        for layer in lm.model.layers[:2]:
            x = layer(x, *lm.rotary(torch.arange(9).expand(2, 9)), None, 0, None,
                      torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 9, 9))
    logits = lm.lm_head(hidden)
    torch.testing.assert_close(logits[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1, :6], ref[1, :6], rtol=1e-5, atol=1e-5)  # padding never leaks backwards
    assert len(states) == 4
    torch.testing.assert_close(states[-2][0], x[0], rtol=1e-5, atol=1e-5)
