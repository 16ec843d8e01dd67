"""Many conversions from one spec (``models.toml``), on whatever runs them.

A spec lists models (a folder, optionally a PEFT adapter) with their quantizations and settings,
shared defaults, and the base URL the bundles will be served from. It is validated as a whole
(every problem listed, exit 2) and expanded into **items**: one model in one quantization each,
numbered from 0 in spec order. One item is the unit every engine runs, with one idempotent command:

    llm2wasm batch run models.toml --item N -o OUT      (N defaults to $JOB_COMPLETION_INDEX)

It converts item N into ``OUT/<model_id>/`` (a re-run of a finished item resumes in seconds, as
``llm2wasm convert`` does); ``OUT/.batch/item-N.json`` says ``running`` before it starts and its
outcome when it ends (llm2wasm.batch_status). A failed item keeps its logs in its bundle folder and
touches no other. ``llm2wasm batch collect`` then writes one WebLLM ``AppConfig`` of every bundle
that is complete and a JSON report. The same items feed a GitHub Actions matrix (``batch matrix``)
and a Kubernetes Indexed Job (``batch k8s``, llm2wasm.batch_k8s).

Runs in the image (standard library only).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# outcomes and the Kubernetes manifests live beside this module, named here for the callers of
# llm2wasm.batch (tasks.py, the tests)
from .batch_k8s import kubernetes_manifests, to_yaml
from .batch_status import STATUS_DIR, Outcome, collect, outcomes, run_item, status_path, table
from .convert.inputs import LINK_OPT_LEVELS
from .errors import UsageError

__all__ = [
    "STATUS_DIR",
    "BatchSpec",
    "Item",
    "Outcome",
    "collect",
    "item_index",
    "kubernetes_manifests",
    "load_spec",
    "matrix",
    "outcomes",
    "parse_spec",
    "run_item",
    "status_path",
    "table",
    "to_yaml",
]

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
            if key not in MODEL_KEYS:
                problems.append(f"{where}: unknown key {key!r}{_nearest(key, MODEL_KEYS)}")
        _check_settings(where, entry, problems)
        settings = {**defaults, **entry}
        model_path = entry.get("path")
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


# --- the item command ------------------------------------------------------------------------------


def item_index(given: int | None) -> int:
    if given is not None:
        return given
    value = os.environ.get(INDEX_VARIABLE)
    if value is None:
        raise UsageError(f"which item? pass --item N, or set {INDEX_VARIABLE} (a Kubernetes Indexed Job does)")
    if not value.isdigit():
        raise UsageError(f"{INDEX_VARIABLE}={value!r} is not an item number")
    return int(value)


# --- engines ----------------------------------------------------------------------------------------


def matrix(spec: BatchSpec) -> dict:
    """The GitHub Actions matrix of a spec: one job per item (`strategy.matrix: ${{ fromJSON(...) }}`)."""
    return {
        "include": [
            {"item": item.index, "model_id": item.model_id, "quantization": item.quantization} for item in spec.items
        ]
    }


# --- command line -----------------------------------------------------------------------------------


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="batch_command", metavar="STEP", required=True)

    def spec_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        step = sub.add_parser(name, help=help_text)
        step.add_argument("spec", metavar="SPEC", help="the batch spec (models.toml)")
        step.add_argument("--root", help="where the spec's paths start (default: the spec's folder)")
        return step

    check = spec_parser("check", "validate a spec and list its items")
    check.set_defaults(run=_run_check)
    run = spec_parser("run", "convert one item (the unit every engine runs)")
    run.add_argument("--item", type=int, help=f"item number (default: ${INDEX_VARIABLE})")
    run.add_argument("--output", "-o", required=True, metavar="OUT", help="bundles go to OUT/<model_id>/")
    run.set_defaults(run=_run_item)
    collect_step = spec_parser("collect", "one app config of every bundle that succeeded, and a report")
    collect_step.add_argument("--output", "-o", required=True, metavar="OUT")
    collect_step.set_defaults(run=_run_collect)
    matrix_step = spec_parser("matrix", "the GitHub Actions matrix (JSON) of the items")
    matrix_step.set_defaults(run=_run_matrix)
    k8s = spec_parser("k8s", "a Kubernetes Indexed Job (YAML) whose pod N runs item N")
    k8s.add_argument("--image", required=True, help="the published llm2wasm image")
    k8s.add_argument("--claim", default="llm2wasm-batch", help="PersistentVolumeClaim with models and outputs")
    k8s.add_argument("--name", default="llm2wasm-batch", help="name of the Job (and its ConfigMap)")
    k8s.add_argument("--parallelism", type=int, default=2, help="pods at once")
    k8s.set_defaults(run=_run_k8s)


def _spec(args, *, check_paths: bool = True) -> BatchSpec:
    path = Path(args.spec)
    return load_spec(path, Path(args.root) if args.root else None, check_paths=check_paths)


def _run_check(args) -> int:
    spec = _spec(args)
    for item in spec.items:
        adapter = f" + {item.adapter}" if item.adapter else ""
        print(f"{item.index}\t{item.model_id}\t{item.path}{adapter}\t{item.quantization}")
    print(f"{spec.path}: {len(spec.items)} item(s), served from {spec.base_url}<model_id>/", file=sys.stderr)
    return 0


def _run_item(args) -> int:
    spec = _spec(args)
    return run_item(spec, item_index(args.item), Path(args.output))


def _run_collect(args) -> int:
    spec = _spec(args, check_paths=False)
    results, app_config = collect(spec, Path(args.output))
    print(table(results))
    failed = [outcome for outcome in results if outcome.status != "ok"]
    print(
        f"{len(app_config['model_list'])} of {len(results)} bundle(s) in {Path(args.output) / 'app-config.json'}"
        + (f"; {len(failed)} failed or not run" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def _run_matrix(args) -> int:
    print(json.dumps(matrix(_spec(args, check_paths=False))))
    return 0


def _run_k8s(args) -> int:
    spec = _spec(args, check_paths=False)
    documents = kubernetes_manifests(
        spec, spec.path.read_text(), image=args.image, claim=args.claim, name=args.name, parallelism=args.parallelism
    )
    print(to_yaml(documents), end="")
    return 0
