"""The layer registry: the one list that build order, verify selection, tags and CI read.

Each layer is an image built ``FROM`` its parent's image (``ARG BASE_IMAGE``), from
``images/<name>/Dockerfile``, and is checked by ``verify/test_<module>.py`` before any layer built
on it. A layer may also join other layers: it copies their results in (``ARG <NAME>_IMAGE``, e.g.
``ML_IMAGE``), so the layers form a graph of branches, not one chain: the web toolchain does not
depend on the ML wheels, and a new wheel pin rebuilds only the ML branch and the join.
``build_args`` maps Dockerfile ARG names to pins in ``images/pins.toml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host.pins import PROJECT_ROOT


@dataclass(frozen=True)
class Layer:
    name: str
    parent: str | None
    summary: str
    # Dockerfile ARG -> pin key
    build_args: dict[str, str] = field(default_factory=dict)
    # Layers whose images this one copies from (COPY --from), besides the one it is built FROM
    joins: tuple[str, ...] = ()
    # Build args the builder derives from a built image: ARG -> the layer whose image it is read
    # from (see build.derive_args)
    derived_args: dict[str, str] = field(default_factory=dict)
    # Build args the preflight fills in: ARG -> the pin whose immutable identity it carries (the
    # commit a git ref is at, the base image's manifest digest; llm2wasm.host.plan). Empty when the build
    # runs with --no-preflight; the Dockerfile then checks nothing against it and its label stays empty.
    resolved_args: dict[str, str] = field(default_factory=dict)
    # A real conversion in the built image (`llm2wasm selftest`) after its checks: no image is
    # recorded as verified, pushed or published unless one ran in it
    selftest: bool = False
    # What the layer adds and why it stays in the image: (path, why). The build report measures
    # each path's growth over the image the layer is built FROM, and what the layer adds elsewhere.
    keeps: tuple[tuple[str, str], ...] = ()

    @property
    def dockerfile(self) -> Path:
        return PROJECT_ROOT / "images" / self.name / "Dockerfile"

    @property
    def check_module(self) -> Path:
        return PROJECT_ROOT / "verify" / f"test_{self.name.replace('-', '_')}.py"

    @property
    def depends_on(self) -> tuple[str, ...]:
        """The layers that must be built (and pass their checks) before this one."""
        return ((self.parent,) if self.parent else ()) + self.joins

    def tag(self, profile: str, repository: str = "llm2wasm") -> str:
        return f"{repository}:{self.name}-{profile}"


def image_arg(layer: str) -> str:
    """The Dockerfile ARG that names a joined layer's image: ml -> ML_IMAGE."""
    return f"{layer.upper().replace('-', '_')}_IMAGE"


LAYERS: tuple[Layer, ...] = (
    Layer(
        "base",
        None,
        "OS base with the tools conversions use (curl, wget, unzip, git, git-lfs, nano, CA certificates)",
        {"BASE_IMAGE": "base_image", "BASE_IMAGE_NAME": "base_image"},
        resolved_args={"BASE_IMAGE_DIGEST": "base_image"},
        keeps=(("/usr", "the distribution and the tools conversions call: git, git-lfs, curl, patch, make"),),
    ),
    Layer(
        "python",
        "base",
        "Python from the distribution in a virtual environment at /opt/venv, first on PATH",
        {"PYTHON_VERSION": "python_version"},
        keeps=(
            ("/usr", "the distribution's Python"),
            ("/opt/venv", "the virtual environment every later Python package goes into"),
        ),
    ),
    Layer(
        "ml",
        "python",
        "torch, transformers, peft, bitsandbytes and the MLC wheels (mlc-ai + mlc-llm)",
        {
            "PIP_OPTIONS": "pip_options",
            "MLC_WHEEL_INDEX": "mlc_wheel_index",
            "MLC_AI_REQUIREMENT": "mlc_ai_requirement",
            "MLC_LLM_REQUIREMENT": "mlc_llm_requirement",
            "TVM_FFI_REQUIREMENT": "tvm_ffi_requirement",
            "TORCH_REQUIREMENT": "torch_requirement",
            "TRANSFORMERS_REQUIREMENT": "transformers_requirement",
            "PEFT_REQUIREMENT": "peft_requirement",
            "BITSANDBYTES_REQUIREMENT": "bitsandbytes_requirement",
            "ML_LOCK": "ml_lock",
        },
        keeps=(
            ("/opt/venv", "torch, transformers, peft, bitsandbytes and the MLC wheels, which conversions import"),
            ("/opt/llm2wasm", "the CUDA driver stub that lets TVM load where no driver is mounted"),
        ),
    ),
    # The web toolchain branch: built from the Python layer (emsdk runs on Python), not the ML wheels
    Layer(
        "emsdk",
        "python",
        "emscripten: a pinned emsdk checkout with the pinned SDK, or Debian's package; emcc, node, npm on PATH",
        {
            "EMSCRIPTEN_SOURCE": "emscripten_source",
            "EMSDK_REPO": "emsdk_repo",
            "EMSDK_REF": "emsdk_ref",
            "EMSDK_VERSION": "emsdk_version",
            "EMSDK_DOWNLOADS_URL": "emsdk_downloads_url",
        },
        resolved_args={"EMSDK_COMMIT": "emsdk_ref"},
        keeps=(
            (
                "/opt/emsdk",
                "emsdk's emscripten with its LLVM, binaryen and node: every model library's compiler and linker",
            ),
            ("/usr", "Debian's emscripten, clang, binaryen and node (profiles with emscripten_source=debian)"),
        ),
    ),
    Layer(
        "web-runtime",
        "emsdk",
        "the mlc-llm and TVM web runtimes, built from mlc-llm at the pinned ref and its TVM; keeps their outputs only",
        {"MLC_LLM_REPO": "mlc_llm_repo", "MLC_LLM_REF": "mlc_llm_ref"},
        resolved_args={"MLC_LLM_COMMIT": "mlc_llm_ref"},
        keeps=(
            ("/opt/mlc-llm", "the runtimes every compile links (web/dist/wasm) and BUILT_FROM; not their sources"),
            (
                "/opt/emsdk/upstream/emscripten/cache",
                "system libraries emscripten built for the runtimes, reused at each link",
            ),
        ),
    ),
    # The join: the web toolchain's image with the ML branch's virtual environment copied in
    Layer(
        "runtime-env",
        "web-runtime",
        "the ML wheels joined onto the web toolchain; LD_LIBRARY_PATH from the installed nvidia-* wheels; "
        "TVM's emcc.py patched, its longrope kernel fixed (patches/)",
        joins=("ml",),
        derived_args={"CUDA_LIBRARY_PATH": "ml"},
        keeps=(
            ("/opt/venv", "the ML branch's environment, copied in whole (it replaces the python layer's)"),
            ("/opt/llm2wasm", "the CUDA driver stub and the patches to TVM"),
        ),
    ),
    Layer(
        "app",
        "runtime-env",
        "the llm2wasm command (convert, selftest, preview) with the WGSL validator and the pinned WebLLM",
        {
            "PIP_OPTIONS": "pip_options",
            "WGSL_VALIDATOR_REQUIREMENT": "wgsl_validator_requirement",
            "NPM_REGISTRY": "npm_registry",
            "WEBLLM_VERSION": "webllm_version",
            "WEBLLM_INTEGRITY": "webllm_integrity",
        },
        keeps=(
            ("/opt/venv", "the llm2wasm package and the WGSL validator"),
            ("/opt/llm2wasm/webllm", "the pinned WebLLM that preview and the browser check serve"),
        ),
        selftest=True,
    ),
)

LAYERS_BY_NAME = {layer.name: layer for layer in LAYERS}
FINAL_LAYER = LAYERS[-1].name


def get_layer(name: str) -> Layer:
    try:
        return LAYERS_BY_NAME[name]
    except KeyError:
        known = ", ".join(LAYERS_BY_NAME)
        raise UsageError(f"unknown layer {name!r}: choose one of {known}") from None


def ancestors(name: str) -> list[Layer]:
    """The layer and every layer it is built from or joins, in build order (base first)."""
    wanted: set[str] = set()
    pending = [get_layer(name).name]
    while pending:
        current = pending.pop()
        if current not in wanted:
            wanted.add(current)
            pending.extend(LAYERS_BY_NAME[current].depends_on)
    return [layer for layer in LAYERS if layer.name in wanted]


def descendants(name: str) -> list[Layer]:
    """Every layer built from or joining ``name``, directly or not, in build order."""
    return [layer for layer in LAYERS if layer.name != name and name in {a.name for a in ancestors(layer.name)}]


def layers_until(name: str | None) -> list[Layer]:
    """Layers in build order, up to and including ``name`` (all when None)."""
    if name is None:
        return list(LAYERS)
    return ancestors(name)


def validate_registry() -> None:
    """The registry is in build order (every layer after what it depends on) and every file it names exists."""
    seen: set[str] = set()
    for layer in LAYERS:
        for dependency in layer.depends_on:
            if dependency not in seen:
                raise AssertionError(f"layer {layer.name} comes before {dependency}, which it depends on")
        for arg, source in layer.derived_args.items():
            if source not in layer.depends_on:
                raise AssertionError(f"layer {layer.name} derives {arg} from {source}, which it does not depend on")
        for arg, pin in layer.resolved_args.items():
            if pin not in layer.build_args.values() or arg in layer.build_args:
                raise AssertionError(f"layer {layer.name}: {arg} carries what pin {pin} resolved to; pass {pin} too")
        seen.add(layer.name)
    for layer in LAYERS:
        for path in (layer.dockerfile, layer.check_module):
            if not path.is_file():
                raise AssertionError(f"layer {layer.name}: {path} is missing")


def registry_json() -> str:
    """The registry for CI (a build matrix) and other tools that are not Python."""
    return json.dumps(
        [
            {
                "name": layer.name,
                "parent": layer.parent,
                "joins": list(layer.joins),
                "dockerfile": str(layer.dockerfile.relative_to(PROJECT_ROOT)),
                "checks": str(layer.check_module.relative_to(PROJECT_ROOT)),
                "summary": layer.summary,
            }
            for layer in LAYERS
        ],
        indent=2,
    )


if __name__ == "__main__":
    print(registry_json())
