"""GRACE training: LSQ fake-quant QAT, gated decoupled KD, relational CKA, IB controller, exports.

``prepare(model)`` swaps the language-model linears for ``LSQLinear``; ``export_qat`` / ``export_awq``
write GRACE's QAT and AWQ checkpoint folders; ``train(TrainConfig(...))`` (CLI ``gracevlm train``) runs
the training loop. Heavy modules (trainer, data) load on first use.
"""
from .export import export_awq, export_qat, checkpoint_config, save_dense_checkpoint
from .losses import (IBController, dkd_terms, entropy_gate, gated_dkd_loss, gated_dkd_loss_flat, rcka_loss,
                     rcka_loss_batched, rcka_loss_sets, rcka_weight)
from .qat import DEFAULT_SKIP_KEYWORDS, lsq_layers, prepare


def __getattr__(name):
    if name in ("TrainConfig", "Trainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gracevlm.train' has no attribute {name!r}")


__all__ = ["IBController", "TrainConfig", "Trainer", "train", "prepare", "lsq_layers", "export_qat", "export_awq",
           "save_dense_checkpoint", "checkpoint_config", "gated_dkd_loss", "gated_dkd_loss_flat", "dkd_terms",
           "entropy_gate", "rcka_loss", "rcka_loss_batched", "rcka_loss_sets", "rcka_weight", "DEFAULT_SKIP_KEYWORDS"]
