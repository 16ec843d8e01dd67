// STAND-IN source for TVM web/emcc/wasm_runtime.cc; the stand-in emcc compiles nothing.
