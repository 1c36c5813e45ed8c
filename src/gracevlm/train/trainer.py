"""GRACE training loop: QAT student (LSQ) distilled from a full-precision teacher.

Methods (``TrainConfig.method``):

* ``grace``: ``L = CE + beta * GDKD + omega * RCKA``; ``beta`` from ``IBController`` (updated once per
  optimizer step with the GDKD value averaged over micro-batches and ranks), ``omega`` linear warm-up;
  RCKA on the image-token hidden states at LLM layer ``rcka_layer`` (-2), teacher vs student.
* ``qat``: the same LSQ student trained with CE only (no teacher).
* ``fp``: plain full-precision training with CE (used to train the demo teacher).

Data order is a function of ``(seed, epoch)`` only: optimizer step ``k`` consumes global samples
``k*G .. (k+1)*G - 1`` of the concatenated per-epoch permutations, ``G = world * batch_size * grad_accum``;
micro-step ``a`` of rank ``r`` takes the slice ``(a * world + r) * batch_size``. A checkpoint stores the
model, optimizer, controller, step (= data position) and RNG states, so a resumed run repeats the
uninterrupted one bit for bit. Data parallel: ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on CUDA);
gradients are averaged with one all-reduce of a flat buffer, so every rank applies identical updates
(checked at the end: ``ranks.json``).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import CheckpointError, InputError
from ..formats.pack import pack_qat_checkpoint
from ..models.loader import load_checkpoint
from ..nn import Int4Linear, Int8Linear
from .data import ConversationDataset, load_records
from .export import export_qat, save_dense_checkpoint
from .losses import IBController, gated_dkd_loss_flat, rcka_loss_batched, rcka_loss_sets, rcka_weight
from .qat import prepare

log = logging.getLogger(__name__)
METHODS = ("grace", "qat", "fp")
STATE_NAME = "trainer_state.pt"


@dataclass
class TrainConfig:
    data: str
    model: str
    out: str
    image_folder: str | None = None
    method: str = "grace"
    teacher: str | None = None  # default for grace: the initial model
    steps: int | None = None  # optimizer steps; default from epochs
    epochs: float = 1.0
    batch_size: int = 4  # per process and micro-step
    grad_accum: int = 1
    lr: float = 2e-5
    scale_lr: float = 1e-4
    vision_lr: float | None = None  # default: lr (only used with train_vision)
    projector_lr: float | None = None  # default: lr (LLaVA's mm_projector_lr)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    bits: int = 4
    group_size: int = 128
    scale_init: str = "mse"
    temperature: float = 2.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 4.0
    ib_tau: float = 3.0
    ib_eta: float = 0.003
    ib_beta_init: float = 0.5
    ib_beta_min: float = 0.1
    ib_beta_max: float = 1.0
    ib_ema_decay: float = 0.99
    rcka_weight: float = 3.0
    rcka_warmup: int = 400
    rcka_layer: int = -2
    train_vision: bool = False
    train_projector: bool = True
    conv_mode: str | None = None  # LLaVA's template (default vicuna_v1); Qwen3-VL uses the checkpoint's own
    max_length: int | None = None  # default: the positions the model takes (the training format's max_length)
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" (latest in out/checkpoints) or a checkpoint folder
    stop_after: int | None = None  # run at most this many steps in this invocation, then checkpoint and exit
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    plot: bool = True  # loss.png at every checkpoint (matplotlib)
    export: bool = True
    export_dtype: str | None = None  # default: the family's release dtype (Qwen3-VL bf16), else float16
    threads: int | None = None
    device: str = "cpu"
    dkd_chunk: int = 1024
    extra: dict = field(default_factory=dict)  # free-form, recorded in the log header

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise InputError("batch_size and grad_accum must be >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.export_dtype not in (None, "float16", "bfloat16", "float32"):
            raise InputError(f"export_dtype must be float16, bfloat16 or float32, got {self.export_dtype!r}")


# ---------------------------------------------------------------------------------------------------
# helpers


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("GRACEVLM_DIST_BACKEND") != "gloo" \
                else "gloo"
            dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (identical models, identical digest)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = sorted(glob.glob(os.path.join(os.fspath(out), "checkpoints", "step-*", STATE_NAME)))
    return Path(found[-1]).parent if found else None


def _load_model(folder: str, device: str, fuse: bool, student: bool = True):
    """A checkpoint in fp32 for training. The student needs dense weights; a teacher only runs forward, so it
    may be quantized (INT4/INT8 linears)."""
    loaded = load_checkpoint(folder, dtype=torch.float32, fuse=fuse, half_lm_head=False)
    model = loaded.model
    if student and any(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules()):
        raise CheckpointError(f"{folder} is a quantized ({loaded.stats.format}) checkpoint; the student needs "
                              "dense weights (a fp16/bf16/fp32 checkpoint of the family)")
    if getattr(model, "vision_tower", None) is None:
        raise CheckpointError(f"{folder} has no vision tower; gracevlm train expects a vision-language model")
    for p in model.parameters():
        # fp32 master weights for every parameter (the loader keeps embed_tokens in the file's dtype; AdamW on
        # fp16 parameters underflows), in memory the trainer owns (tensors may come from mapped files)
        p.data = p.data.to(torch.float32, copy=True)
    return loaded, model.to(device)


# ---------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = _dist_info()
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if cfg.device == "cuda" else cfg.device)
        self.out = Path(cfg.out)
        self.is_main = self.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.loaded, self.model = _load_model(cfg.model, self.device, fuse=False)
        self.base_config = dict(self.loaded.config.raw)
        self.tokenizer = self.loaded.tokenizer
        self.family = self.loaded.family
        if cfg.method in ("grace", "qat"):
            self.n_quantized = prepare(self.model, cfg.bits, cfg.group_size, cfg.scale_init)
            if self.n_quantized == 0:
                raise InputError("no language-model linear was found to quantize")
        else:
            self.n_quantized = 0
        self.teacher = None
        if cfg.method == "grace":
            teacher_loaded, self.teacher = _load_model(cfg.teacher or cfg.model, self.device, fuse=True, student=False)
            if teacher_loaded.family is not self.loaded.family:
                raise InputError(f"the teacher is a {teacher_loaded.family.name} model but the student a "
                                 f"{self.loaded.family.name} one; GRACE distils within one family")
            vocab = [m.language_model.lm_head.weight.shape[0] for m in (self.model, self.teacher)]
            if vocab[0] != vocab[1]:
                raise InputError(f"the teacher's vocabulary has {vocab[1]} rows but the student's {vocab[0]}; GDKD "
                                 "compares their logits token by token, so they must share the tokenizer")
            self.teacher.eval().requires_grad_(False)
        self._set_trainable()
        self.model.train()

        fmt = self.family.training_format(self.loaded, cfg.conv_mode)
        max_len = cfg.max_length or fmt.max_length
        self.dataset = ConversationDataset(load_records(cfg.data), fmt, cfg.image_folder, max_len)
        if len(self.dataset) == 0:
            raise InputError(f"{cfg.data} holds no records")
        self.n_patches = self.family.image_tokens(self.model)
        self.global_batch = self.world * cfg.batch_size * cfg.grad_accum
        self.total_steps = cfg.steps if cfg.steps is not None else \
            max(1, math.ceil(cfg.epochs * len(self.dataset) / self.global_batch))
        self.warmup_steps = int(math.ceil(cfg.warmup_ratio * self.total_steps))

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
        self.controller = IBController(cfg.ib_tau, cfg.ib_eta, cfg.ib_beta_init, cfg.ib_beta_min, cfg.ib_beta_max,
                                       cfg.ib_ema_decay) if cfg.method == "grace" else None
        self.step = 0
        self._perms: dict[int, torch.Tensor] = {}
        if cfg.resume:
            self._resume(cfg.resume)

    # -- setup ---------------------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        """AdamW groups: LSQ log-scales (``scale_lr``, no weight decay), vision tower (``vision_lr``),
        projector (``projector_lr``) and everything else (``lr``); empty groups are dropped."""
        cfg = self.cfg
        buckets: dict[str, list] = {"weights": [], "vision": [], "projector": [], "scales": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            part = self.family.training_part(name)
            if name.endswith(".log_scale"):
                buckets["scales"].append(p)
            elif part in ("vision", "projector"):
                buckets[part].append(p)
            else:
                buckets["weights"].append(p)
        lrs = {"weights": cfg.lr, "vision": cfg.vision_lr or cfg.lr, "projector": cfg.projector_lr or cfg.lr,
               "scales": cfg.scale_lr}
        return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k,
                 "weight_decay": 0.0 if k == "scales" else cfg.weight_decay} for k, ps in buckets.items() if ps]

    def _set_trainable(self) -> None:
        cfg = self.cfg
        for name, p in self.model.named_parameters():
            part = self.family.training_part(name)
            if part == "vision":
                p.requires_grad = cfg.train_vision
            elif part == "projector":
                p.requires_grad = cfg.train_projector
            else:
                p.requires_grad = True

    # -- data ----------------------------------------------------------------------------------------
    def _sample(self, k: int) -> int:
        n = len(self.dataset)
        epoch, pos = divmod(k, n)
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            self._perms = {epoch: perm}
        return int(perm[pos])

    def micro_batch(self, step: int, accum: int) -> dict:
        mb = self.cfg.batch_size
        base = step * self.global_batch + (accum * self.world + self.rank) * mb
        batch = self.dataset.collate([self._sample(base + j) for j in range(mb)], self.n_patches)
        return {k: (v.to(self.device) if v is not None else v) for k, v in batch.items()}  # tensors, ImagePixels

    # -- one step ------------------------------------------------------------------------------------
    def _micro_losses(self, batch: dict, beta: float, omega: float) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        grace = cfg.method == "grace"
        out = self.family.forward_batch(self.model, batch, cfg.rcka_layer if grace else None)
        if out.targets.numel():
            ce = F.cross_entropy(out.logits, out.targets)
        else:
            ce = out.logits.sum() * 0.0
        stats = {"ce": ce.item(), "tokens": float(out.targets.numel())}
        loss = ce
        if grace:
            with torch.no_grad():
                tout = self.family.forward_batch(self.teacher, batch, cfg.rcka_layer)
            gdkd = gated_dkd_loss_flat(out.logits, tout.logits, out.targets, cfg.temperature, cfg.dkd_alpha,
                                       cfg.dkd_beta, chunk_size=cfg.dkd_chunk)
            if isinstance(out.image_hidden, list):  # images of different token counts
                rcka, n_valid = rcka_loss_sets(out.image_hidden, tout.image_hidden)
            elif out.image_hidden is not None:
                rcka, valid = rcka_loss_batched(out.image_hidden, tout.image_hidden)
                n_valid = float(valid.sum())
            else:
                rcka, n_valid = out.logits.sum() * 0.0, 0.0
            loss = ce + beta * gdkd + omega * rcka
            stats.update(gdkd=gdkd.item(), rcka=rcka.item(), rcka_valid=float(n_valid > 0))
        stats["loss"] = loss.item()
        return loss, stats

    def _all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _all_reduce_stats(self, stats: dict) -> dict:
        if self.world == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def train_step(self) -> dict:
        cfg = self.cfg
        mult = lr_multiplier(self.step, self.total_steps, self.warmup_steps, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        beta = self.controller.beta if self.controller is not None else 0.0
        omega = rcka_weight(self.step, cfg.rcka_weight, cfg.rcka_warmup) if cfg.method == "grace" else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for a in range(cfg.grad_accum):
            loss, stats = self._micro_losses(self.micro_batch(self.step, a), beta, omega)
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v / cfg.grad_accum)
        self._all_reduce_grads()
        stats = self._all_reduce_stats(sums)
        if self.world > 1:
            stats["tokens"] *= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                   else float("inf"))
        self.optimizer.step()
        record = {"step": self.step + 1, "epoch": (self.step + 1) * self.global_batch / len(self.dataset),
                  "lr": cfg.lr * mult, **stats, "grad_norm": float(grad_norm)}
        if self.controller is not None:
            record["beta"] = beta
            record["omega"] = omega
            self.controller.update(stats["gdkd"])
        self.step += 1
        return record

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": 1, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "rng": _rng_state(),
                "data": {"n_examples": len(self.dataset), "global_batch": self.global_batch, "seed": self.cfg.seed,
                         "samples_seen": self.step * self.global_batch, "total_steps": self.total_steps},
                "config": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "extra"}}

    def save_checkpoint(self) -> Path | None:
        if not self.is_main:
            return None
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:07d}"
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{self.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(self.state_dict(), tmp / STATE_NAME)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(root.glob("step-*"))
        for old in kept[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _resume(self, where: str) -> None:
        folder = latest_checkpoint(self.out) if where == "auto" else Path(where)
        if folder is None:
            log.info("resume=auto: no checkpoint in %s, starting from scratch", self.out)
            return
        path = folder / STATE_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} not found; not a gracevlm training checkpoint")
        state = torch.load(path, map_location="cpu", weights_only=True)
        data = state["data"]
        mine = {"n_examples": len(self.dataset), "global_batch": self.global_batch, "seed": self.cfg.seed}
        for key, value in mine.items():
            if data[key] != value:
                raise CheckpointError(f"cannot resume from {folder}: it was trained with {key}={data[key]}, this "
                                      f"run has {key}={value} (the data order would differ)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.controller is not None:
            if state["controller"] is None:
                raise CheckpointError(f"{folder} has no IB controller state (trained with another method)")
            self.controller.load_state_dict(state["controller"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.is_main:
            log.info("resumed from %s at step %d", folder, self.step)

    # -- logging -------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def _truncate_log(self) -> None:
        if not self.is_main or not self.log_path.is_file():
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= self.step:
                keep.append(line)
        self.log_path.write_text("".join(k + "\n" for k in keep))

    # -- main loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self._truncate_log()
        end = self.total_steps if cfg.stop_after is None else min(self.total_steps, self.step + cfg.stop_after)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.method}", unit="step",
                   disable=not (cfg.progress and self.is_main), dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        last = None
        with open(self.log_path, "a", encoding="utf-8") if self.is_main else _NullFile() as logf:
            while self.step < end:
                record = self.train_step()
                record["seconds"] = round(time.perf_counter() - t0, 3)
                last = record
                if self.is_main and (record["step"] % max(1, cfg.log_every) == 0 or self.step == end):
                    logf.write(json.dumps(record) + "\n")
                    logf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save_checkpoint()
                    self._plot()
        bar.close()
        self.save_checkpoint()
        self._plot()
        digest = self._check_ranks()
        summary = {"steps": self.step, "total_steps": self.total_steps, "finished": self.step >= self.total_steps,
                   "last": last, "digest": digest, "out": str(self.out)}
        if summary["finished"] and cfg.export and self.is_main:
            summary.update(self.export())
        if self.world > 1:
            dist.barrier()
        return summary

    def _plot(self) -> None:
        if not (self.is_main and self.cfg.plot):
            return
        from .plot import plot_log

        try:
            plot_log(self.log_path, self.out / "loss.png")
        except ImportError:
            log.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")

    def _check_ranks(self) -> str:
        digest = parameter_digest(self.model)
        if self.world > 1:
            digests: list = [None] * self.world
            dist.all_gather_object(digests, digest)
            if self.is_main:
                (self.out / "ranks.json").write_text(json.dumps(
                    {"world_size": self.world, "step": self.step, "sha256": digests,
                     "identical": len(set(digests)) == 1}, indent=1) + "\n")
            if len(set(digests)) != 1:
                raise RuntimeError(f"data-parallel ranks diverged: parameter digests {digests}")
        return digest

    def export(self) -> dict:
        """Write the trained model: ``out/model`` (fp) or ``out/qat`` (grace, qat) and, up to 4 bits, ``out/awq``
        (the ``gracevlm pack`` of it; the AWQ GEMM layout holds 4-bit words, so W8 has none).

        Dtypes: ``export_dtype`` if given, else the family's release dtype (Qwen3-VL: bf16 for every tensor,
        baked weights ``bf16(q * s)``), else float16 with baked weights in the training dtype (LLaVA)."""
        family_dtype = self.family.release_dtype
        dtype = getattr(torch, self.cfg.export_dtype or family_dtype or "float16")
        weight_dtype = dtype if family_dtype is not None else None
        self.model.eval()
        if self.cfg.method == "fp":
            path = save_dense_checkpoint(self.model, self.out / "model", self.base_config, self.cfg.model, dtype,
                                         force=True)
            return {"model": str(path)}
        qat = export_qat(self.model, self.out / "qat", self.base_config, self.cfg.model, dtype, weight_dtype,
                         force=True)
        if self.cfg.bits > 4:  # 8-bit codes do not fit the 4-bit GEMM words (3-bit ones do)
            return {"qat": str(qat)}
        report = pack_qat_checkpoint(qat, self.out / "awq", force=True, progress=False)
        return {"qat": str(qat), "awq": str(self.out / "awq"), "pack": report.as_dict()}


class _NullFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass


def train(cfg: TrainConfig) -> dict:
    """Build a ``Trainer`` and run it; returns a summary (steps, last log record, exported folders).
    A process group this call created (``torchrun``) is destroyed at the end."""
    owned = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        return Trainer(cfg).run()
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
