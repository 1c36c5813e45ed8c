"""``python -m gracevlm.eval ...`` == ``gracevlm eval ...``."""
from .cli import main

raise SystemExit(main())
