#!/usr/bin/env bash
# Set up a machine for llm2wasm: Docker engine with BuildKit (installed and started when missing,
# which needs root), then a virtual environment in .venv with the toolkit and dev tools, then the
# f16 tests' WebGPU runner (tests/webgpu_node/setup.sh: Mesa 25's lavapipe, Node, npm ci).
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

# The f16 tests' WebGPU (tests/integration/test_webgpu_f16.py): the real WebLLM in Node on Dawn over
# Mesa 25's lavapipe, whose apt packages (bookworm-backports) need root. Idempotent: about a second
# when all is there. Without root it can only check; the f16 tests then fail with what is missing.
webgpu_started=$SECONDS
if [[ $(id -u) -eq 0 ]]; then
  bash tests/webgpu_node/setup.sh
elif ! bash tests/webgpu_node/setup.sh; then
  echo "setup: the WebGPU f16 runner is not set up (run this as root to install it)" >&2
fi
echo "setup: WebGPU f16 runner (Node, Dawn, lavapipe) took $((SECONDS - webgpu_started)) s" >&2
echo "setup: ready (.venv/bin/invoke --list shows the tasks)" >&2
