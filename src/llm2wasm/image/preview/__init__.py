"""`llm2wasm preview OUT`: serve a bundle with a small chat page that runs it in WebLLM."""
