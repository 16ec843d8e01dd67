#!/usr/bin/env bash
# Set up a machine for llm2wasm: Docker engine with BuildKit (installed and started when missing,
# which needs root), then a virtual environment in .venv with the toolkit and dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -eq 0 ]]; then
  bash .ci/install-docker.sh   # idempotent: installs and starts only what is missing
elif ! docker info >/dev/null 2>&1 || ! docker buildx version >/dev/null 2>&1; then
  echo "setup: a running Docker engine with the buildx plugin is needed; run this as root to install" >&2
  echo "       Debian's docker.io and buildx, or install and start Docker yourself." >&2
  exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "setup: ready (.venv/bin/invoke --list shows the tasks)" >&2
