#!/usr/bin/env bash
# The README's main command: set up .venv from scratch, then run stellarlm on the embedded data.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
.venv/bin/stellarlm data build
.venv/bin/stellarlm demo
