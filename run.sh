#!/usr/bin/env bash
# The seed's entry point: forwards every flag to `perfit run`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$here/.venv/bin/perfit" ]; then exec "$here/.venv/bin/perfit" run "$@"; fi
exec perfit run "$@"
