"""The GitHub Actions matrix of a spec: one job per item, each running ``llm2wasm batch run --item N``
(docs/BATCH.md; .github/workflows/convert.yml reads it with ``fromJSON``)."""

from __future__ import annotations

from llm2wasm.image.batch.spec import BatchSpec


def matrix(spec: BatchSpec) -> dict:
    """The GitHub Actions matrix of a spec: one job per item (`strategy.matrix: ${{ fromJSON(...) }}`)."""
    return {
        "include": [
            {"item": item.index, "model_id": item.model_id, "quantization": item.quantization} for item in spec.items
        ]
    }
