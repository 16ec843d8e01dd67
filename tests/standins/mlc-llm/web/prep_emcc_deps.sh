#!/bin/bash
# STAND-IN for mlc-llm's web/prep_emcc_deps.sh (same shape as upstream's): needs emcc and npm,
# updates submodules, builds web/ (dist/wasm/mlc_wasm_runtime.bc), then TVM's web runtime with
# TVM_HOME=$TVM_SOURCE_DIR. Run from the repository root.
set -euxo pipefail

emcc --version
npm --version

TVM_SOURCE_DIR_SET="${TVM_SOURCE_DIR:-}"
git submodule update --init --recursive

if [[ -z "${TVM_SOURCE_DIR_SET}" ]]; then
  TVM_SOURCE_DIR=3rdparty/tvm
fi
TVM_SOURCE_DIR="$(cd "$TVM_SOURCE_DIR" && pwd)"

cd web && make && cd -
cd "${TVM_SOURCE_DIR}/web" && TVM_HOME="${TVM_SOURCE_DIR}" make && cd -
