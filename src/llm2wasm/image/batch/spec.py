"""A batch spec (``models.toml``), parsed and checked as a whole, expanded into items.

A spec lists models (a folder or a Hub model id, optionally a PEFT adapter, a folder or a Hub id too)
with their quantizations and settings, shared defaults, and the base URL the bundles will be served
from. Every problem is listed at once (exit 2). Each **item** is one model in one quantization,
numbered from 0 in spec order: the unit every engine runs (llm2wasm.image.batch.command). Runs in the
image (standard library only).

A Hub model (``hub = "org/name[@revision]"``) is only named here: an item's container has no network,
so whoever starts it fetches the model first and hands the container the fetched folder
(``batch run --fetched-model``); `invoke batch` does (llm2wasm.host.batchrun). Engines with no such
step before their containers (the GitHub workflow, the Kubernetes Job) refuse Hub items
(``refuse_hub_models``), with the command that fetches each into the folder they read.
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
    "hub",
    "adapter",
    "adapter_hub",
    "quantizations",
    "conv_template",
    "context_window",
    "prefill_chunk_size",
    "link_opt",
    "model_id",
    "resources",
}
DEFAULT_KEYS = MODEL_KEYS - {"path", "hub", "adapter", "adapter_hub", "model_id"}
TOP_KEYS = {"base_url", "defaults", "model"}
# A Hub id as `invoke convert` takes it, org/name[@revision], checked here with the standard library
# as the Hub checks repository names (llm2wasm.host.hubfetch.parse_hub_ref checks it again with the
# client's own rules before fetching); a revision is a branch, a tag, a commit or a ref like refs/pr/1.
HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
HUB_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
HUB_EXAMPLES = {
    "hub": 'hub = "Qwen/Qwen2.5-0.5B-Instruct" or hub = "Qwen/Qwen2.5-0.5B-Instruct@main"',
    "adapter_hub": 'adapter_hub = "org/support-lora" or adapter_hub = "org/support-lora@v1"',
}
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
    path: str | None  # as written in the spec, relative to the spec's folder; None for a Hub model
    quantization: str
    model_id: str
    adapter: str | None = None
    conv_template: str | None = None
    context_window: int | None = None
    prefill_chunk_size: int | None = None
    link_opt: str | None = None  # None: llm2wasm convert's default
    resources: dict[str, str] = field(default_factory=dict)
    hub: str | None = None  # a Hub model, org/name[@revision], in place of path
    adapter_hub: str | None = None  # a Hub adapter, in place of adapter

    @property
    def model(self) -> str:
        """The model as the spec names it: its folder or its Hub id."""
        return self.hub or str(self.path)

    @property
    def adapter_named(self) -> str | None:
        return self.adapter_hub or self.adapter

    def convert_argv(
        self,
        root: Path,
        output: Path,
        base_url: str,
        fetched_model: Path | None = None,
        fetched_adapter: Path | None = None,
    ) -> list[str]:
        """The `llm2wasm convert` arguments for this item, its bundle in OUT/<model_id>/. A Hub model
        or adapter is read from the folder it was fetched into before the container started."""
        for role, hub, fetched in (("model", self.hub, fetched_model), ("adapter", self.adapter_hub, fetched_adapter)):
            if fetched is not None and hub is None:
                raise UsageError(f"item {self.index}'s {role} is not a Hub {role}: it takes no fetched folder")
        model = self._fetched("model", self.hub, fetched_model) if self.hub else root / str(self.path)
        argv = [str(model), "--quantization", self.quantization]
        argv += ["--output", str(output / self.model_id), "--model-id", self.model_id]
        argv += ["--base-url", f"{base_url}{self.model_id}/"]
        if self.adapter_hub:
            argv += ["--adapter", str(self._fetched("adapter", self.adapter_hub, fetched_adapter))]
        elif self.adapter:
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

    def _fetched(self, role: str, hub: str, folder: Path | None) -> Path:
        given, option = (self.path, "--fetched-model") if role == "model" else (self.adapter, "--fetched-adapter")
        if folder is None:
            raise UsageError(
                f"item {self.index} names the Hub {role} {hub}, and an item's container has no network: run the spec "
                f"with `invoke batch`, which fetches it on the host and mounts it ({option}), or fetch it into the "
                f"spec's folder: {fetch_hint(hub, 'path' if role == 'model' else 'adapter')}"
            )
        if given is not None:  # unreachable for a spec parse_spec accepted; said rather than ignored
            raise UsageError(f"item {self.index} names both a folder and a Hub {role}")
        return folder


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


def fetch_hint(hub: str, key: str = "path") -> str:
    """The command that fetches a Hub model (key "path") or adapter (key "adapter") into a folder
    below the spec's, and the key that then names that folder."""
    repo, _, revision = hub.partition("@")
    folder = f"{'models' if key == 'path' else 'adapters'}/{repo.rsplit('/', 1)[-1] or 'NAME'}"
    pinned = f" --revision {revision}" if revision else ""
    return f'hf download {repo}{pinned} --local-dir {folder}, then {key} = "{folder}"'


def refuse_hub_models(spec: BatchSpec, engine: str) -> None:
    """For an engine whose items start with nothing before them that could fetch (a GitHub Actions
    job, a Kubernetes pod: no network by design, no token): a UsageError listing each Hub model
    and adapter of the spec with the command that fetches it into the folder `engine` reads."""
    fixes: dict[tuple[int, str], str] = {}
    for item in spec.items:
        for key, hub in (("path", item.hub), ("adapter", item.adapter_hub)):
            if hub:
                fixes.setdefault((item.entry, key), f"model {item.entry}: {fetch_hint(hub, key)}")
    if fixes:
        listed = "\n".join(f"  - {fix}" for fix in fixes.values())
        raise UsageError(
            f"{spec.path}: {engine} has no step that fetches from the Hub (its containers run without network "
            "and get no token), so it takes no hub = or adapter_hub = items. Fetch each there first and name its "
            f"folder, or run the spec with `invoke batch`, which fetches on the host (docs/BATCH.md):\n{listed}"
        )


def hub_id_problem(value: object) -> str | None:
    """Why `value` is not org/name[@revision], or None when it is."""
    if not isinstance(value, str):
        return "is not a string"
    repo, at, revision = value.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(HUB_NAME.fullmatch(part) for part in parts):
        return "is not org/name[@revision] (letters, digits, '.', '_' or '-' on either side of one '/')"
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return "has '--', '..' or a '.git' ending, which the Hub refuses in a repository name"
    if at and (not HUB_REVISION.fullmatch(revision) or ".." in revision or revision.endswith(("/", ".lock"))):
        return f"has no revision the Hub can have after '@' ({revision!r}): give a branch, a tag or a commit id"
    return None


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
        where = f"model {number} ({entry.get('path') or entry.get('hub') or 'no path'})"
        for key in entry:
            if key not in MODEL_KEYS:
                problems.append(f"{where}: unknown key {key!r}{_nearest(key, MODEL_KEYS)}")
        _check_settings(where, entry, problems)
        settings = {**defaults, **entry}
        model_path, hub = entry.get("path"), entry.get("hub")
        for folder_key, hub_key in (("path", "hub"), ("adapter", "adapter_hub")):
            if folder_key in entry and hub_key in entry:
                problems.append(f"{where}: give {folder_key} (a folder) or {hub_key} (a Hub id), not both")
        if model_path is None and hub is None:
            problems.append(
                f'{where}: path is missing: the model folder, e.g. path = "models/Qwen2.5-0.5B-Instruct", '
                f"or a Hub model, {HUB_EXAMPLES['hub']}"
            )
            continue
        for key in ("hub", "adapter_hub"):
            if key in entry and (why := hub_id_problem(entry[key])):
                problems.append(f"{where}: {key} {entry[key]!r} {why}; write e.g. {HUB_EXAMPLES[key]}")
        if model_path is None and hub_id_problem(hub):
            continue  # said above
        if model_path is not None and (not isinstance(model_path, str) or not model_path):
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
        # the bundle's name: the folder's, or the Hub repository's (as `invoke convert org/name` names it)
        default_name = Path(model_path).name if model_path is not None else hub.partition("@")[0].rsplit("/", 1)[-1]
        name = entry.get("model_id", default_name)
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
                    hub=hub,
                    adapter_hub=entry.get("adapter_hub"),
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
