// STAND-IN source for TVM web/emcc/webgpu_runtime.cc; the stand-in emcc compiles nothing.
