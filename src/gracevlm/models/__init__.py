"""Model families behind a registry (``registry.py``), the one checkpoint opener and the shared LLaMA decoder."""
