"""The GitHub Actions matrix of a spec: one job per item, each running ``llm2wasm batch run --item N``
(docs/BATCH.md; .github/workflows/convert.yml reads it with ``fromJSON``). Runs in the image."""

from __future__ import annotations

from llm2wasm.image.batch.spec import BatchSpec, refuse_hub_models


def matrix(spec: BatchSpec) -> dict:
    """The GitHub Actions matrix of a spec: one job per item (`strategy.matrix: ${{ fromJSON(...) }}`).
    Hub items are refused: the workflow runs the item command straight in the image, without network
    and without a token, and has no step before it that could fetch."""
    refuse_hub_models(spec, "the GitHub workflow (.github/workflows/convert.yml)")
    return {
        "include": [
            {"item": item.index, "model_id": item.model_id, "quantization": item.quantization} for item in spec.items
        ]
    }
