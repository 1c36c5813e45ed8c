"""OpenAI-compatible HTTP server over the batching engine (``gracevlm serve``).

Modules: ``protocol`` (request/response shapes), ``serving`` (request -> engine -> response / SSE),
``media`` (image URLs under a policy), ``metrics`` (Prometheus text), ``app`` (routes and the gate),
``cli`` (``register(subparsers)``, ``main(argv)``). FastAPI and uvicorn are imported only here.
"""
