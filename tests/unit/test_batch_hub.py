"""A batch spec naming a Hub model: refused with the command that fetches it, since a batch's items
run in containers without network and take folders under the spec's folder only (docs/HUB.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.batch.spec import parse_spec

SPEC = """
[defaults]
quantizations = ["q4f16_1"]

[[model]]
hub = "Qwen/Qwen2.5-0.5B-Instruct@v1"
"""


def test_a_hub_item_is_refused_with_the_fetch_command(tmp_path):
    with pytest.raises(UsageError) as refused:
        parse_spec(SPEC, tmp_path / "models.toml", check_paths=False)
    message = str(refused.value)
    assert "a batch takes local model folders only, not hub = 'Qwen/Qwen2.5-0.5B-Instruct@v1'" in message
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct --revision v1 --local-dir models/Qwen2.5-0.5B-Instruct" in message
    assert 'path = "models/Qwen2.5-0.5B-Instruct"' in message
    assert "path is missing" not in message  # said once, with the fix


def test_the_fetched_folder_is_then_an_ordinary_item(tmp_path):
    (tmp_path / "models" / "Qwen2.5-0.5B-Instruct").mkdir(parents=True)
    text = SPEC.replace('hub = "Qwen/Qwen2.5-0.5B-Instruct@v1"', 'path = "models/Qwen2.5-0.5B-Instruct"')
    (item,) = parse_spec(text, Path(tmp_path / "models.toml")).items
    assert (item.path, item.model_id) == ("models/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct-q4f16_1")
