"""What ships into the image and runs there: the ``llm2wasm`` command (convert, selftest, preview,
batch) and the scripts other layers copy in.

Import rule (tests/unit/test_imports.py): modules here import only the standard library, other
image-side modules and ``llm2wasm.errors`` at import time; torch, transformers, peft and mlc_llm
are imported inside the functions that need them. Nothing here imports ``llm2wasm.host``.
"""
