"""The host's toolkit: what runs on the user's machine (or a CI runner) around the image.

It builds and verifies the layer images (the build graph, the preflight, the checks' plumbing),
runs conversions and previews in containers, and talks to registries and the Hugging Face Hub.
It may use third-party packages (docker, requests, huggingface_hub, ...). What ships into the
image and runs there lives in ``llm2wasm.image`` and imports only the standard library at import
time; the host imports from it (shared names such as the bundle's layout), never the reverse.
"""
