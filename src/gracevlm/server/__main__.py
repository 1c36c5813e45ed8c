"""``python -m gracevlm.server --model DIR [--port P] ...``"""
from .cli import main

raise SystemExit(main())
