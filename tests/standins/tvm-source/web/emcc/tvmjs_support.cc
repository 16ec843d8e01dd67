// STAND-IN source for TVM web/emcc/tvmjs_support.cc; the stand-in emcc compiles nothing.
