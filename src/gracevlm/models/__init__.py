"""Model families, one folder each (``llava/``, ``qwen3_vl/``)."""
