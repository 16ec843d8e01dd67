"""STAND-IN for the mlc_llm package (mlc-ai/mlc-llm v0.20.0, python/mlc_llm): not MLC LLM.

It imports the real TVM as the real package does, parses the same arguments, exits the same way
and writes the same files, so llm2wasm's conversion code can be tested without GPU, network or
the MLC wheels. It converts nothing: weights are copied into shards, the wasm is a stand-in.
"""

import tvm  # noqa: F401  (the real package imports TVM and its native library on import)

__version__ = "0.20.0.dev0"
STANDIN = True
