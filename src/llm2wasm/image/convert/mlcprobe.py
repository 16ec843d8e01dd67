"""What the installed mlc_llm reads, asked of mlc_llm itself in the image's Python.

mlc_llm's model config classes decide which config.json keys a conversion honours, and its weight
loaders which tensors it reads. Rather than a table of both per version, the installed package is
probed (in a subprocess: importing mlc_llm takes seconds and is not needed elsewhere): its config
class's source for the keys it reads and the rope types its model implements, and whether a
loader takes the output head from another tensor. llm2wasm.image.convert.hfconfig maps
transformers' view of a model onto what this says.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.mlc import python_executable

# Rope types transformers knows (transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS, plus its own
# "default"); an mlc_llm model implements one when its module names it (Llama: "llama3", Phi3:
# "longrope" and its older name "su").
ROPE_TYPE_ALIASES = {"su": "longrope"}

_PROBE_SCRIPT = """
import inspect, json, sys
from mlc_llm.model import MODELS
model_type = sys.argv[1]
if model_type not in MODELS:
    print(json.dumps({"supported": sorted(MODELS)}))
    raise SystemExit(0)
config_class = MODELS[model_type].config
classes = [c for c in config_class.__mro__ if c.__module__.startswith("mlc_llm.model.")]
print(json.dumps({
    "class_sources": [inspect.getsource(c) for c in classes],
    "module_source": inspect.getsource(sys.modules[config_class.__module__]),
}))
"""


# Which checkpoint tensors the installed mlc_llm's loader reads for a config: its parameter
# mapping (MODELS[t].source["huggingface-safetensor"]), built as convert_weight builds it.
_HEAD_PROBE_SCRIPT = """
import json, sys
from mlc_llm.model import MODELS
from mlc_llm.quantization import QUANTIZATION
model = MODELS[sys.argv[1]]
with open(sys.argv[2]) as handle:
    config = model.config.from_dict(json.load(handle))
mapping = model.source["huggingface-safetensor"](config, QUANTIZATION["q0f32"])
head = {tuple(names) for name, names in mapping.param_map.items() if "lm_head" in name}
others = {tuple(names) for name, names in mapping.param_map.items() if "lm_head" not in name}
print(json.dumps({"head_from_other_tensor": bool(head & others)}))
"""


class ProbeFailed(Exception):
    """A probe script exited non-zero in the image's Python; the message is its stderr."""


def _run_probe(script: str, *args: str) -> dict:
    """Run `script` in the image's Python (where mlc_llm is installed: the stable profile's nightly
    may differ from what llm2wasm was written against) and return the JSON its last line prints."""
    result = subprocess.run([python_executable(), "-c", script, *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise ProbeFailed(result.stderr.strip())
    return json.loads(result.stdout.strip().splitlines()[-1])


def probe_reads_output_head(model_type: str, config: dict) -> bool | None:
    """Whether the installed mlc_llm's weight loader for `config` reads an output head of the
    checkpoint's own: False when its head (`lm_head...`) is read from the very tensor another of
    its parameters reads (the input embeddings). None when the mapping cannot be built here (said
    on stderr): gen_config and convert_weight then report what is wrong with the config."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(config, handle)
        handle.flush()
        try:
            data = _run_probe(_HEAD_PROBE_SCRIPT, model_type, handle.name)
        except ProbeFailed as failure:
            last = (str(failure).splitlines() or ["no output"])[-1]
            print(f"llm2wasm: warning: could not build mlc_llm's weight mapping to check the output head: {last}",
                  file=sys.stderr)  # fmt: skip
            return None
    return not data["head_from_other_tensor"]


@dataclass(frozen=True)
class MlcConfigReads:
    """What an mlc_llm model config class reads from config.json."""

    fields: frozenset[str]  # dataclass fields (filled from config.json keys of the same name)
    names: frozenset[str]  # every string its class bodies name (kwargs keys __post_init__ reads)
    rope_types: frozenset[str]  # rope types its model module names

    def reads(self, key: str) -> bool:
        return key in self.fields or key in self.names


def reads_from_sources(class_sources: list[str], module_source: str, known_rope_types: set[str]) -> MlcConfigReads:
    """Parse the config classes' source (the class and its mlc_llm parents) and the model module."""
    fields: set[str] = set()
    names: set[str] = set()
    for source in class_sources:
        tree = ast.parse(_dedent(source))
        for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
            for item in cls.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    fields.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    fields.update(t.id for t in item.targets if isinstance(t, ast.Name))
            names.update(n.value for n in ast.walk(cls) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    module_strings = {
        n.value for n in ast.walk(ast.parse(module_source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    rope_types = {
        ROPE_TYPE_ALIASES.get(s, s) for s in module_strings if s in known_rope_types or s in ROPE_TYPE_ALIASES
    }
    return MlcConfigReads(frozenset(fields - {"kwargs"}), frozenset(names), frozenset(rope_types))


def _dedent(source: str) -> str:
    lines = source.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines)


def probe_installed_mlc(model_type: str, known_rope_types: set[str]) -> MlcConfigReads:
    """Read the installed mlc_llm's config class for `model_type` (in the image's Python)."""
    try:
        data = _run_probe(_PROBE_SCRIPT, model_type)
    except ProbeFailed as failure:
        raise UsageError(
            f"cannot read the installed mlc_llm's config class for {model_type!r} "
            f"(is this the llm2wasm image?):\n{str(failure)[-2000:]}"
        ) from None
    if "supported" in data:
        raise UsageError(
            f"model_type {model_type!r} is not supported by the installed mlc_llm; it supports: "
            f"{', '.join(data['supported'])}"
        )
    return reads_from_sources(data["class_sources"], data["module_source"], known_rope_types)
