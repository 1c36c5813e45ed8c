"""gracevlm: runtime and toolkit for 4-bit GRACE vision-language models."""
__version__ = "0.1.0"
