"""Synthesis of checkpoints, tokenizers and corpora in the exact on-disk layouts (tooling, not the runtime)."""
