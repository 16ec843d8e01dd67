"""`invoke convert`: the model's source, one conversion per quantization, and where each came from.

The model is resolved once (a local folder, or a Hub id fetched once: llm2wasm.host.hubconvert), then
converted once per quantization asked for (`-q q4f16_1,q4f32_1`), each in its own container and its
own bundle. With one quantization OUT is the bundle; with several, OUT holds one bundle per
quantization named as WebLLM names its prebuilt models, `<model>-<quantization>-MLC`, each with its
own library and weights (and its own gen_config: a quantization changes the generated config), ready
for `invoke publish-bundle` to publish one repository per quantization, as WebLLM's own list has them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host import run
from llm2wasm.host.hubconvert import ModelSource, record_source, resolve_adapter_source, resolve_model_source
from llm2wasm.host.run import ConvertJob, convert_options

QUANTIZATION_NAME = re.compile(r"q\d+f\d+(_\d+)?")


def quantizations_of(text: str) -> list[str]:
    """`-q`'s value: one quantization or a comma-separated list, each once, in the order given. The
    names themselves are checked in the image against the installed mlc_llm."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise UsageError(f"-q {text!r}: an empty name in the list; give e.g. -q q4f16_1 or -q q4f16_1,q4f32_1")
    odd = [name for name in names if not QUANTIZATION_NAME.fullmatch(name)]
    if odd:
        raise UsageError(f"-q {text!r}: {', '.join(odd)} is no quantization name; give e.g. q4f16_1,q4f32_1")
    return list(dict.fromkeys(names))


def model_name(model: str, source: ModelSource) -> str:
    """The model's own name for the bundles' folders: the Hub repository's, or the local folder's."""
    if source.from_hub:
        return str(source.provenance["repo_id"]).rsplit("/", 1)[-1]
    return Path(model).expanduser().resolve().name


def outputs_for(output: Path, quantizations: list[str], name: str) -> dict[str, Path]:
    """The bundle of each quantization: OUT itself for one; OUT/<name>-<quantization>-MLC for several."""
    if len(quantizations) == 1:
        return {quantizations[0]: output}
    return {quantization: output / f"{name}-{quantization}-MLC" for quantization in quantizations}


@dataclass
class ConvertCommand:
    """What `invoke convert` was given (options: the keywords of llm2wasm.host.run.convert_options)."""

    model: str
    quantization: str
    output: Path
    image: str
    adapter: str | None = None  # a folder or a Hub adapter id
    options: dict = field(default_factory=dict)
    gpu: bool | None = None
    library_cache: Path | None = None
    allow_pickle: bool = False


def convert_command(command: ConvertCommand) -> int:
    """Run every conversion; the exit status of the first that fails (the rest are not started), or 0."""
    quantizations = quantizations_of(command.quantization)
    if len(quantizations) > 1 and command.options.get("model_id"):
        raise UsageError(
            "--model-id names one bundle; with several quantizations each is named <model>-<quantization>-MLC: "
            "drop --model-id, or convert one quantization at a time"
        )
    adapter = resolve_adapter_source(command.adapter, allow_pickle=command.allow_pickle)
    source = resolve_model_source(command.model, allow_pickle=command.allow_pickle)  # a Hub id: fetched once
    outputs = outputs_for(command.output, quantizations, model_name(command.model, source))
    job = ConvertJob(
        image=command.image,
        model_dir=source.model_dir,
        model_files=source.model_files,
        shown_model=source.shown_model,
        output=command.output,
        quantization=quantizations[0],
        adapter=adapter.model_dir if adapter else None,
        adapter_files=adapter.model_files if adapter else None,
        shown_adapter=adapter.shown_model if adapter else None,
        options=convert_options(**command.options),
        gpu=command.gpu,
        library_cache=command.library_cache,
    )
    for number, (quantization, output) in enumerate(outputs.items(), start=1):
        if len(outputs) > 1:
            print(f"llm2wasm: [{number}/{len(outputs)}] {quantization} -> {output}", file=sys.stderr, flush=True)
        status = run.run_convert_job(replace(job, quantization=quantization, output=output))
        if status:
            if number < len(outputs):
                print(f"llm2wasm: stopped; not converted: {', '.join(list(outputs)[number:])}", file=sys.stderr)
            return status
        record_source(output, source, adapter_merged=adapter is not None, adapter=adapter)  # for publish-bundle
    return 0
