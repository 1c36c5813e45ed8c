"""Shared by the export tests: one tiny synthesized checkpoint per format per session."""
from gracevlm.synth.checkpoint import synthesize


def tiny_checkpoint(tmp_path_factory, fmt="awq"):
    path = tmp_path_factory.getbasetemp() / "export-ckpts" / f"tiny-{fmt}"
    if not path.exists():
        synthesize(path, "tiny", fmt, seed=7, progress=False)
    return path
