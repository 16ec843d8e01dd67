"""Scripts copied alone into a layer and run there with the image's python (standard library only,
no llm2wasm imports): the CUDA driver stub (ml layer), TVM's source patches (runtime-env layer), and
the CUDA library search (piped into an image's python by llm2wasm.host.build)."""
