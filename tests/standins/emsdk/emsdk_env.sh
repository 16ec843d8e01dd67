# STAND-IN for emsdk's emsdk_env.sh: like upstream, it evals `emsdk construct_env`.
# Source it from bash: `source ./emsdk_env.sh`.
_llm2wasm_emsdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
eval "$(EMSDK_BASH=1 "$_llm2wasm_emsdk_dir/emsdk" construct_env)"
unset _llm2wasm_emsdk_dir
