"""How llm2wasm drives mlc_llm: always `python -m mlc_llm` in a subprocess (the console script may
be missing from the scikit-build wheels), and valid names read from the installed package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache

from llm2wasm.errors import UsageError

# What WebLLM ships model libraries for (web-llm prebuiltAppConfig). bf16, fp8, AWQ/FT kernels
# and the *_0 / *_2 group layouts are not for WebGPU.
WEBGPU_QUANTIZATIONS = ("q0f16", "q0f32", "q3f16_1", "q4f16_1", "q4f32_1")

_NAMES_SCRIPT = """
import json
from mlc_llm.quantization import QUANTIZATION
from mlc_llm.interface.gen_config import CONV_TEMPLATES
from mlc_llm.model import MODELS
print(json.dumps({"quantizations": sorted(QUANTIZATION), "conv_templates": sorted(CONV_TEMPLATES),
                  "model_types": sorted(MODELS)}))
"""


def python_executable() -> str:
    """The Python that has mlc_llm (the image's venv); LLM2WASM_PYTHON overrides it."""
    return os.environ.get("LLM2WASM_PYTHON", sys.executable)


@dataclass(frozen=True)
class MlcNames:
    quantizations: tuple[str, ...]
    conv_templates: tuple[str, ...]
    model_types: tuple[str, ...] = ()  # the architectures (config.json's model_type) it converts; () = not read


@cache
def installed_names() -> MlcNames:
    result = subprocess.run([python_executable(), "-c", _NAMES_SCRIPT], capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(
            "cannot read quantization and template names from the installed mlc_llm "
            f"(is this the llm2wasm image?):\n{result.stderr.strip()[-2000:]}"
        )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return MlcNames(tuple(data["quantizations"]), tuple(data["conv_templates"]), tuple(data["model_types"]))


def mlc_command(*args: str) -> list[str]:
    return [python_executable(), "-m", "mlc_llm", *args]


ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MEMORY_PATTERNS = {
    "without_kv_cache_mb": re.compile(r"Total memory usage without KV cache:\s*([\d.]+)\s*MB"),
    "parameters_mb": re.compile(r"Parameters:\s*([\d.]+)\s*MB"),
    "temporary_buffer_mb": re.compile(r"Temporary buffer:\s*([\d.]+)\s*MB"),
    "kv_cache_mb_per_token": re.compile(r"KV cache size:\s*([\d.]+)\s*MB per token"),
    "with_4k_kv_cache_mb": re.compile(r"Total memory usage with a 4K KV cache:\s*([\d.]+)\s*MB"),
}


def parse_memory(log_text: str) -> dict[str, float]:
    """The memory figures `mlc_llm compile` logs (ANSI-coloured, on stderr); absent ones are left out."""
    text = ANSI.sub("", log_text)
    figures = {}
    for key, pattern in _MEMORY_PATTERNS.items():
        match = pattern.search(text)
        if match:
            figures[key] = float(match.group(1))
    return figures
