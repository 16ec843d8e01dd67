"""What the unit tests share: the batch spec of tests/unit/test_batch*.py and its folder."""

from __future__ import annotations

from pathlib import Path

import pytest

SPEC = """
base_url = "https://models.example.com/webllm"

[defaults]
quantizations = ["q4f16_1"]
context_window = 2048

[[model]]
path = "models/qwen"
adapter = "adapters/support"
quantizations = ["q4f16_1", "q0f32"]
conv_template = "chatml"
model_id = "qwen-support"
resources = { cpu = "4", memory = "16Gi" }

[[model]]
path = "models/llama"
prefill_chunk_size = 1024
link_opt = "O3"
resources = { cpu = "2", memory = "24Gi", gpu = 1 }
"""


@pytest.fixture
def spec_dir(tmp_path) -> Path:
    for folder in ("models/qwen", "models/llama", "adapters/support"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "models.toml").write_text(SPEC)
    return tmp_path
