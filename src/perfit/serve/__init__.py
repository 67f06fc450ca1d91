"""`perfit serve`: an OpenAI-compatible HTTP server over one `PerFitModel`. `schemas` validates requests, `engine`
batches generation and runs personalization and erasure on one worker thread, `app` is the FastAPI face."""
from ..extras import require

# checked here, before any submodule imports fastapi: without the extra, `perfit serve` says what to install
require("serve", "perfit serve")
