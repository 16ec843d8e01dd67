"""A batch spec (``models.toml``), parsed and checked as a whole, expanded into items.

A spec lists models (a folder, optionally a PEFT adapter) with their quantizations and settings,
shared defaults, and the base URL the bundles will be served from. Every problem is listed at once
(exit 2). Each **item** is one model in one quantization, numbered from 0 in spec order: the unit
every engine runs (llm2wasm.image.batch.command). Runs in the image (standard library only).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.inputs import LINK_OPT_LEVELS

MODEL_KEYS = {
    "path",
    "adapter",
    "quantizations",
    "conv_template",
    "context_window",
    "prefill_chunk_size",
    "link_opt",
    "model_id",
    "resources",
}
DEFAULT_KEYS = MODEL_KEYS - {"path", "adapter", "model_id"}
TOP_KEYS = {"base_url", "defaults", "model"}
HUB_KEY = "hub"  # `invoke convert` takes a Hub id; a batch does not (yet)
RESOURCE_KEYS = {"cpu", "memory", "gpu"}
# mlc_llm's quantization names: q<weight bits>f<float bits>[_<variant>] (q4f16_1, q0f32, q4f16_ft ...)
QUANTIZATION = re.compile(r"q\d+f\d+(_\w+)?")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_BASE_URL = "http://localhost:8000/"
INDEX_VARIABLE = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True)
class Item:
    index: int
    entry: int  # which [[model]] of the spec
    path: str  # as written in the spec, relative to the spec's folder
    quantization: str
    model_id: str
    adapter: str | None = None
    conv_template: str | None = None
    context_window: int | None = None
    prefill_chunk_size: int | None = None
    link_opt: str | None = None  # None: llm2wasm convert's default
    resources: dict[str, str] = field(default_factory=dict)

    def convert_argv(self, root: Path, output: Path, base_url: str) -> list[str]:
        """The `llm2wasm convert` arguments for this item, its bundle in OUT/<model_id>/."""
        argv = [str(root / self.path), "--quantization", self.quantization]
        argv += ["--output", str(output / self.model_id), "--model-id", self.model_id]
        argv += ["--base-url", f"{base_url}{self.model_id}/"]
        if self.adapter:
            argv += ["--adapter", str(root / self.adapter)]
        if self.conv_template:
            argv += ["--conv-template", self.conv_template]
        if self.context_window:
            argv += ["--context-window", str(self.context_window)]
        if self.prefill_chunk_size:
            argv += ["--prefill-chunk-size", str(self.prefill_chunk_size)]
        if self.link_opt:
            argv += ["--link-opt", self.link_opt]
        return argv


@dataclass(frozen=True)
class BatchSpec:
    path: Path
    root: Path  # where the spec's relative paths start
    base_url: str
    items: list[Item]

    def item(self, index: int) -> Item:
        if not 0 <= index < len(self.items):
            raise UsageError(
                f"item {index} is not in {self.path}: it has items 0 to {len(self.items) - 1} "
                "(`llm2wasm batch check` lists them)"
            )
        return self.items[index]


def _nearest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_settings(where: str, table: dict, problems: list[str]) -> None:
    """The settings a model entry and the defaults share."""
    quantizations = table.get("quantizations")
    if quantizations is not None:
        if not isinstance(quantizations, list) or not quantizations:
            problems.append(f'{where}: quantizations must be a non-empty list, e.g. ["q4f16_1"]')
        else:
            for name in quantizations:
                if not isinstance(name, str) or not QUANTIZATION.fullmatch(name):
                    problems.append(f"{where}: quantization {name!r} is not an mlc_llm name like q4f16_1 or q0f32")
            if len(set(map(str, quantizations))) != len(quantizations):
                problems.append(f"{where}: quantizations lists one twice: {quantizations}")
    for key in ("context_window", "prefill_chunk_size"):
        if key in table and not _positive_int(table[key]):
            problems.append(f"{where}: {key} must be a positive number of tokens, not {table[key]!r}")
    if "link_opt" in table and table["link_opt"] not in LINK_OPT_LEVELS:
        problems.append(
            f"{where}: link_opt must be one of {', '.join(LINK_OPT_LEVELS)} (emcc's -O level of the link), "
            f"not {table['link_opt']!r}"
        )
    if "conv_template" in table and not (isinstance(table["conv_template"], str) and table["conv_template"]):
        problems.append(f'{where}: conv_template must be a template name, e.g. "chatml"')
    resources = table.get("resources", {})
    if not isinstance(resources, dict):
        problems.append(f'{where}: resources must be a table, e.g. {{ cpu = "4", memory = "16Gi" }}')
    else:
        for key, value in resources.items():
            if key not in RESOURCE_KEYS:
                problems.append(f"{where}: unknown resource {key!r}{_nearest(key, RESOURCE_KEYS)}")
            elif not isinstance(value, str | int) or isinstance(value, bool):
                problems.append(f'{where}: resource {key} must be a quantity like "4" or "16Gi", not {value!r}')


def _check_base_url(value: object, problems: list[str]) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        problems.append(
            f"base_url {value!r} is not an absolute http(s) URL: WebLLM needs absolute URLs. "
            'Example: base_url = "https://example.com/models/"'
        )
        return DEFAULT_BASE_URL
    return value if value.endswith("/") else value + "/"


def parse_spec(text: str, path: Path, root: Path | None = None, *, check_paths: bool = True) -> BatchSpec:
    """Validate a spec as a whole and expand it into items; every problem is listed at once."""
    root = root if root is not None else path.parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path} is not valid TOML: {error}") from None
    problems: list[str] = []
    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"unknown key {key!r}{_nearest(key, TOP_KEYS)}")
    base_url = _check_base_url(data.get("base_url", DEFAULT_BASE_URL), problems)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append("[defaults] must be a table")
        defaults = {}
    for key in defaults:
        if key not in DEFAULT_KEYS:
            problems.append(f"[defaults]: unknown key {key!r}{_nearest(key, DEFAULT_KEYS)}")
    _check_settings("[defaults]", defaults, problems)
    entries = data.get("model", [])
    if not isinstance(entries, list) or not entries:
        problems.append('no models: add one or more [[model]] tables with path = "..."')
        entries = []
    items: list[Item] = []
    for number, entry in enumerate(entries):
        where = f"model {number}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a [[model]] table")
            continue
        where = f"model {number} ({entry.get('path', 'no path')})"
        for key in entry:
            if key == HUB_KEY:
                # the items run in containers without network: a Hub model has to be fetched on the host first
                repo, _, revision = str(entry[key]).partition("@")
                name = repo.rsplit("/", 1)[-1] or "NAME"
                pinned = f" --revision {revision}" if revision else ""
                problems.append(
                    f"{where}: a batch takes local model folders only, not hub = {entry[key]!r}: fetch it first "
                    f'(hf download {repo}{pinned} --local-dir models/{name}) and give path = "models/{name}" '
                    "(docs/HUB.md)"
                )
            elif key not in MODEL_KEYS:
                problems.append(f"{where}: unknown key {key!r}{_nearest(key, MODEL_KEYS)}")
        _check_settings(where, entry, problems)
        settings = {**defaults, **entry}
        model_path = entry.get("path")
        if HUB_KEY in entry and model_path is None:
            continue  # said above
        if not isinstance(model_path, str) or not model_path:
            problems.append(f'{where}: path is missing: the model folder, e.g. path = "models/Qwen2.5-0.5B-Instruct"')
            continue
        for key in ("path", "adapter"):
            value = entry.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or Path(value).is_absolute() or ".." in Path(value).parts:
                problems.append(f"{where}: {key} {value!r} must be a folder below the spec's folder ({root})")
            elif check_paths and not (root / value).resolve().is_relative_to(root.resolve()):
                # the container mounts only the spec's folder; a link out would reach its other mounts
                problems.append(f"{where}: {key} {value!r} is a symlink out of the spec's folder: copy the folder in")
            elif check_paths and not (root / value).is_dir():
                problems.append(f"{where}: {key} {value!r} is not a folder under {root}")
        name = entry.get("model_id", Path(model_path).name)
        if not isinstance(name, str) or not MODEL_ID.fullmatch(name):
            problems.append(f"{where}: model_id {name!r} must be letters, digits, '.', '_' or '-' (it names files)")
            continue
        quantizations = settings.get("quantizations")
        if quantizations is None:
            problems.append(f'{where}: no quantizations: set them here or in [defaults], e.g. ["q4f16_1"]')
            continue
        if not isinstance(quantizations, list):
            continue
        for quantization in quantizations:
            if not isinstance(quantization, str):
                continue
            items.append(
                Item(
                    index=len(items),
                    entry=number,
                    path=model_path,
                    quantization=quantization,
                    model_id=f"{name}-{quantization}",
                    adapter=entry.get("adapter"),
                    conv_template=settings.get("conv_template"),
                    context_window=settings.get("context_window"),
                    prefill_chunk_size=settings.get("prefill_chunk_size"),
                    link_opt=settings.get("link_opt"),
                    resources={k: str(v) for k, v in dict(settings.get("resources") or {}).items()},
                )
            )
    seen: dict[str, Item] = {}
    for item in items:
        if item.model_id in seen:
            problems.append(
                f"model {item.entry}: model_id {item.model_id!r} is also model {seen[item.model_id].entry}'s: "
                "set model_id on one of them (bundles and WebLLM's model list need unique ids)"
            )
        seen.setdefault(item.model_id, item)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise UsageError(f"{path}: {len(problems)} problem(s), nothing was converted:\n{listed}")
    return BatchSpec(path=path, root=root, base_url=base_url, items=items)


def load_spec(path: Path, root: Path | None = None, *, check_paths: bool = True) -> BatchSpec:
    if not path.is_file():
        raise UsageError(f"batch spec {path} not found: write a models.toml (docs/BATCH.md shows one)")
    return parse_spec(path.read_text(), path, root, check_paths=check_paths)
