// STAND-IN source for mlc-llm web/emcc/mlc_wasm_runtime.cc
