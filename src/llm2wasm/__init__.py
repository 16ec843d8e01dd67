"""llm2wasm: build, verify and publish the image that turns Hugging Face models into WebLLM bundles.

The package has two halves with different dependencies:

* the toolkit (pins, layers, plan, build, verify, publish) runs on the host and needs the
  ``toolkit`` extra (docker CLI, pytest-testinfra, invoke);
* ``llm2wasm.image.convert`` ships inside the image and needs only the standard library plus what the
  image already has (mlc_llm, transformers, peft).
"""

__version__ = "0.1.0"
