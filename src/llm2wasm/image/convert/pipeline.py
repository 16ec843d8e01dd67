"""`llm2wasm convert`: [merge PEFT] -> gen_config -> (convert_weight || compile) -> WebLLM bundle.

This module takes a conversion from the command's arguments to a bundle: the input views, the
conversation template, the check that OUT holds no bundle of other settings, the output lock, and
what is said at the end. The run itself is llm2wasm.image.convert.converter (which step runs, and
when; resumable), each step's action llm2wasm.image.convert.steps, the record of finished steps
llm2wasm.image.convert.workspace, and the bundle's files llm2wasm.image.convert.bundle.

Bundle layout (what WebLLM fetches):
    OUT/model/resolve/main/   mlc-chat-config.json, tokenizer files, tensor-cache.json, params_shard_*.bin
    OUT/lib/MODEL_ID.wasm     the WebGPU model library
    OUT/app-config.json       a WebLLM AppConfig with one ModelRecord
    OUT/README.md             how to serve it
WebLLM appends `resolve/main/` to a model URL without `/resolve/<rev>/`; serving OUT as it is, the
model URL BASE_URL/model/ therefore reaches OUT/model/resolve/main/.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from llm2wasm import __version__
from llm2wasm.errors import UsageError
from llm2wasm.image.convert.chat import (
    choose,
    has_chat_template,
    render_mlc_templates,
    render_model_template,
    tokenizer_dir,
)
from llm2wasm.image.convert.converter import Converter
from llm2wasm.image.convert.hfconfig import ModelConfigAdapter
from llm2wasm.image.convert.inputs import ConvertRequest, build_request, guess_template, warn
from llm2wasm.image.convert.memory import check_memory
from llm2wasm.image.convert.mlc import installed_names
from llm2wasm.image.convert.outputlock import output_lock
from llm2wasm.image.convert.progress import StepFailed, say
from llm2wasm.image.convert.workspace import STATE_DIR, Workspace, is_previous_bundle, remove
from llm2wasm.image.hostpaths import show_as


def request_identity(request: ConvertRequest) -> dict:
    """What makes a bundle this bundle: a re-run with the same identity resumes, another needs --force."""
    return {
        "model_dir": str(request.model_dir),
        "adapter": str(request.adapter) if request.adapter else None,
        "quantization": request.quantization,
        "conv_template": request.conv_template,
        "model_id": request.model_id,
        "overrides": request.overrides(),
        "base_url": request.base_url,
    }


def summary(output: Path) -> str:
    lines = []
    for path in sorted(output.rglob("*")):
        if path.is_file() and STATE_DIR not in path.relative_to(output).parts:
            lines.append(f"  {path.relative_to(output)}  {path.stat().st_size / 1024:,.1f} KiB")
    return "\n".join(lines)


def choose_conv_template(request: ConvertRequest, names) -> None:
    """Set request.conv_template (and the carried-over system message) by the model's own chat
    template, where it has one (llm2wasm.image.convert.chat); say which and why."""
    folder = tokenizer_dir(request.model_view, request.adapter_view)
    if not has_chat_template(folder):
        return  # the guess from build_request stands, and its note says so
    config = json.loads((request.model_dir / "config.json").read_text())
    given = request.conv_template
    choice = choose(
        render_model_template(folder), render_mlc_templates(), given, guess_template(config, names),
        request.strict_template,
    )  # fmt: skip
    request.conv_template, request.system_message = choice.name, choice.system_message
    if choice.warning:
        request.warnings.append(choice.warning)
    say(f"  conversation template {choice.name}: {choice.reason}")


def run_convert(args) -> int:
    names = installed_names()
    request = build_request(args, names, is_previous_bundle)
    # A pickle checkpoint that passed llm2wasm.image.convert.inputfiles.check_pickle is still loaded with
    # weights_only forced on, whatever mlc_llm, transformers or peft pass to torch.load.
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    with tempfile.TemporaryDirectory(prefix="llm2wasm-inputs-") as views:
        request.model_view = request.model_files.view(Path(views) / "model")
        show_as(str(request.model_view), str(request.model_dir))
        if request.adapter_files is not None:
            request.adapter_view = request.adapter_files.view(Path(views) / "adapter")
            show_as(str(request.adapter_view), str(request.adapter))
        return convert_request(request, names)


def convert_request(request: ConvertRequest, names) -> int:
    for files in (request.model_files, request.adapter_files):
        note = files.note() if files is not None else None
        if note:
            say(f"  {note}")
    choose_conv_template(request, names)
    for message in request.warnings:
        warn(message)
    identity = request_identity(request)
    if is_previous_bundle(request.output) and not request.force:
        previous = Workspace(request.output).state.get("request")
        if previous is not None and previous != identity:
            changed = sorted(key for key in identity if identity[key] != previous.get(key))
            raise UsageError(
                f"{request.output} holds a bundle converted with other settings ({', '.join(changed)}): "
                "pass --force to replace it, or choose another output folder"
            )
    adapter_note = f", adapter {request.adapter}" if request.adapter else ""
    say(
        f"llm2wasm {__version__}: {request.model_dir} -> {request.output} "
        f"({request.quantization}, template {request.conv_template}{adapter_note})"
    )
    # What cannot be handed to mlc_llm faithfully is refused before anything is written or removed.
    model_config = ModelConfigAdapter()
    model_config.check(request.model_view)
    converter = Converter(request, model_config)
    # `--device cuda` without a GPU is bad input too; and so is a conversion this machine cannot hold
    check_memory(request, converter.device(), say)
    with output_lock(request.output):
        return convert_locked(request, converter, identity)


def convert_locked(request: ConvertRequest, converter: Converter, identity: dict) -> int:
    if request.force and request.output.exists():
        # Replace what is there but .llm2wasm/: an earlier bundle's finished steps (their keys
        # decide what is redone) and the lock's owner record, which the lock has just written.
        for entry in request.output.iterdir():
            if entry.name != STATE_DIR:
                remove(entry)
    started = time.monotonic()
    converter.ws.state["request"] = identity
    try:
        converter.run()
    except StepFailed as error:
        print(f"llm2wasm: error: {error}", file=sys.stderr)
        print("llm2wasm: finished steps are kept; re-run the same command to resume", file=sys.stderr)
        return 1
    say(
        f"done in {time.monotonic() - started:.1f}s ("
        + ", ".join(f"{step} {t}" for step, t in converter.timings.items())
        + f"). Bundle in {request.output}:\n"
        + summary(request.output)
    )
    if request.quantization == "q0f32":
        # Users pick q0f32 expecting the checkpoint's weights unchanged; upstream rounds them.
        say(
            "note: mlc_llm stores float32 weights as bfloat16 in the tensor cache (WebLLM widens them on load): "
            "q0f32 computes in float32 with bf16-rounded weights, not a lossless copy of the checkpoint "
            "(docs/MODELS.md)"
        )
    return 0
