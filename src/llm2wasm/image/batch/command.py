"""``llm2wasm batch STEP SPEC``: the command line of a batch (check, run, collect, matrix, k8s)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.batch.github import matrix
from llm2wasm.image.batch.k8s import kubernetes_manifests, to_yaml
from llm2wasm.image.batch.spec import INDEX_VARIABLE, BatchSpec, load_spec
from llm2wasm.image.batch.status import collect, run_item, table


def item_index(given: int | None) -> int:
    if given is not None:
        return given
    value = os.environ.get(INDEX_VARIABLE)
    if value is None:
        raise UsageError(f"which item? pass --item N, or set {INDEX_VARIABLE} (a Kubernetes Indexed Job does)")
    if not value.isdigit():
        raise UsageError(f"{INDEX_VARIABLE}={value!r} is not an item number")
    return int(value)


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
    run.add_argument(
        "--fetched-model",
        metavar="DIR",
        help="a Hub item's model, fetched before this container started (it has no network; `invoke batch` mounts it)",
    )
    run.add_argument("--fetched-adapter", metavar="DIR", help="a Hub item's adapter (adapter_hub), fetched likewise")
    run.set_defaults(run=_run_item)
    collect_step = spec_parser("collect", "one app config of every bundle that succeeded, and a report")
    collect_step.add_argument(
        "--output", "-o", required=True, metavar="OUT", help="the items' output folder (OUT/<model_id>/, OUT/.batch/)"
    )
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
        adapter = f" + {item.adapter_named}" if item.adapter_named else ""
        print(f"{item.index}\t{item.model_id}\t{item.model}{adapter}\t{item.quantization}")
    print(f"{spec.path}: {len(spec.items)} item(s), served from {spec.base_url}<model_id>/", file=sys.stderr)
    return 0


def _run_item(args) -> int:
    spec = _spec(args)
    fetched = [Path(folder) if folder else None for folder in (args.fetched_model, args.fetched_adapter)]
    return run_item(spec, item_index(args.item), Path(args.output), *fetched)


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
