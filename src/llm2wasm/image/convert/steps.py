"""What each step of a conversion does: the command it runs, and the guards and repairs around it.

The merge (peft), gen_config with the conversation's system message and stop tokens and the parity
guard, convert_weight with its fall back to the CPU, compile with its link level and the WGSL check
(llm2wasm.image.convert.wgsl), and the source view that all of them read. Whether a step runs at
all, in which order and side by side with which, is the converter's (llm2wasm.image.convert.converter,
which subclasses ConversionSteps): a step here only makes its output in the folder it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path

from llm2wasm.image.convert.chat import stop_token_ids
from llm2wasm.image.convert.device import choose_device, is_out_of_memory
from llm2wasm.image.convert.hfconfig import HfView, ModelConfigAdapter, parity_mismatches
from llm2wasm.image.convert.inputs import ConvertRequest, warn
from llm2wasm.image.convert.mlc import mlc_command, parse_memory, python_executable
from llm2wasm.image.convert.progress import StepFailed, run_logged, say
from llm2wasm.image.convert.workspace import Workspace, key_of


def link_environment(link_opt: str) -> dict[str, str]:
    """The environment of `mlc_llm compile` with emcc's -O level for the library's link: emcc appends
    EMCC_CFLAGS (its own variable) to its arguments, so the last -O wins over TVM's -O3, and the link
    is the only emcc command mlc_llm compile runs. A user's own EMCC_CFLAGS is kept, before it."""
    env = dict(os.environ)
    env["EMCC_CFLAGS"] = " ".join(filter(None, [env.get("EMCC_CFLAGS", ""), f"-{link_opt}"]))
    return env


def source_view(model_dir: Path, view: Path) -> Path:
    """A folder of symlinks to the model's files. mlc_llm's convert_weight writes
    model.safetensors.index.json beside a single model.safetensors, which fails on a read-only
    mount and should not touch the user's folder anyway."""
    view.mkdir(parents=True)
    for entry in model_dir.iterdir():
        if entry.is_file():
            (view / entry.name).symlink_to(entry)
    return view


class ConversionSteps:
    """The steps' actions, each given the temporary folder it writes into; with what they share:
    the request, the workspace, the device chosen once per run, transformers' view of the model."""

    def __init__(self, request: ConvertRequest, model_config: ModelConfigAdapter | None = None):
        self.request = request
        self.model_config = model_config or ModelConfigAdapter()
        self.hf: HfView | None = None
        self.ws = Workspace(request.output)
        self._device: str | None = None

    def merge(self, tmp: Path) -> None:
        from llm2wasm.image.convert.merge import merge_adapter

        log = self.ws.logs / "merge.log"
        device = self.device()
        try:
            method = "peft" if self.request.peft_merge else "auto"
            what = merge_adapter(self.request.model_view, self.request.adapter_view, tmp / "model", log, device, method)
            say(f"  {what}")
        except Exception as error:
            with open(log, "a") as handle:
                traceback.print_exc(file=handle)
            if device == "cuda" and is_out_of_memory(f"{type(error).__name__}: {error}"):
                say("  merge ran out of GPU memory: merging on the CPU instead")
                shutil.rmtree(tmp / "model", ignore_errors=True)
                self._device = "cpu"
                return self.merge(tmp)
            raise StepFailed("merge", log) from None

    def device(self) -> str:
        """The device for the merge and weight conversion, chosen once per run (and said)."""
        if self._device is None:
            self._device, why = choose_device(self.request.device)
            say(f"  {why}")
        return self._device

    def source_dir(self) -> Path:
        """The folder mlc_llm reads: links to the model's (or the merged model's) files, with the
        config.json the installed mlc_llm reads (llm2wasm.image.convert.hfconfig)."""
        return self.ws.root / "source"

    def prepare_source(self, model_dir: Path) -> str:
        """Lay out the source view of `model_dir` with its adapted config; returns a key of it."""
        view = self.source_dir()
        if view.exists():
            shutil.rmtree(view)
        source_view(model_dir, view)
        config, written, self.hf = self.model_config.adapt(model_dir)
        if written:
            say(
                "  config for mlc_llm (transformers' values, in the keys the installed mlc_llm reads): "
                + "; ".join(written)
            )
        (view / "config.json").unlink()
        (view / "config.json").write_text(json.dumps(config, indent=2))
        return key_of(config)

    def check_parity(self, mlc_chat_config: Path, log: Path) -> None:
        """The hyper-parameters mlc_llm will compile with must be the ones transformers reads."""
        model_config = json.loads(mlc_chat_config.read_text()).get("model_config", {})
        mismatches = parity_mismatches(model_config, self.hf)
        if mismatches:
            with open(log, "a") as handle:
                handle.write(
                    "llm2wasm: parity guard: mlc_llm would compile other hyper-parameters than transformers reads "
                    f"from the model's config.json ({mlc_chat_config.name} model_config vs AutoConfig):\n"
                )
                handle.writelines(f"  {line}\n" for line in mismatches)
            raise StepFailed("gen_config (parity guard: " + "; ".join(mismatches) + ")", log)

    def gen_config(self, tmp: Path) -> None:
        r = self.request
        out = tmp / "config"
        cmd = mlc_command(
            "gen_config",
            str(self.source_dir() / "config.json"),
            "--quantization",
            r.quantization,
            "--conv-template",
            r.conv_template,
            "-o",
            str(out),
        )
        if r.context_window:
            cmd += ["--context-window-size", str(r.context_window)]
        if r.prefill_chunk_size:
            cmd += ["--prefill-chunk-size", str(r.prefill_chunk_size)]
        log = self.ws.logs / "gen_config.log"
        run_logged("gen_config", cmd, log)
        self.adjust_conversation(out / "mlc-chat-config.json", log)
        self.check_parity(out / "mlc-chat-config.json", log)

    def adjust_conversation(self, mlc_chat_config: Path, log: Path) -> None:
        """The model's default system message (where it differs from the template's), and stop
        token ids of this tokenizer: a registered template's ids belong to another vocabulary."""
        data = json.loads(mlc_chat_config.read_text())
        conv = data.get("conv_template")
        tokenizer_json = mlc_chat_config.parent / "tokenizer.json"
        if not isinstance(conv, dict):
            return
        notes = []
        if self.request.system_message is not None:
            conv["system_message"] = self.request.system_message
            notes.append(f"system_message = {self.request.system_message!r} (the model's default)")
        if tokenizer_json.is_file():
            eos = json.loads((self.source_dir() / "config.json").read_text()).get("eos_token_id")
            eos_ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
            ids, missing = stop_token_ids(tokenizer_json, list(conv.get("stop_str") or []), eos_ids)
            if ids != conv.get("stop_token_ids"):
                notes.append(f"stop_token_ids = {ids} (the template had {conv.get('stop_token_ids')})")
                conv["stop_token_ids"] = ids
            for text in missing:
                warn(f"stop string {text!r} of template {conv.get('name')} is no token of this tokenizer: "
                     "WebLLM stops on its text only")  # fmt: skip
        if notes:
            mlc_chat_config.write_text(json.dumps(data, indent=2))
            with open(log, "a") as handle:
                handle.write("llm2wasm: conv_template in mlc-chat-config.json: " + "; ".join(notes) + "\n")
            say("  conversation: " + "; ".join(notes))

    def convert_weight(self, tmp: Path) -> None:
        device = self.device()
        cmd = mlc_command(
            "convert_weight",
            str(self.source_dir() / "config.json"),
            "--quantization",
            self.request.quantization,
            "--device",
            device,
            "-o",
            str(tmp / "weights"),
        )
        log = self.ws.logs / "convert_weight.log"
        try:
            run_logged("convert_weight", cmd, log)
        except StepFailed:
            if device != "cuda" or not is_out_of_memory(log.read_text(errors="replace")):
                raise
            say("  convert_weight ran out of GPU memory: converting the weights on the CPU instead")
            shutil.rmtree(tmp / "weights", ignore_errors=True)
            cmd[cmd.index("--device") + 1] = "cpu"
            run_logged("convert_weight", cmd, log)

    def compile(self, tmp: Path) -> dict:
        r = self.request
        wasm = tmp / f"{r.model_id}.wasm"
        cmd = mlc_command(
            "compile",
            str(self.ws.root / "gen_config" / "config" / "mlc-chat-config.json"),
            "--device",
            "webgpu",
            "-o",
            str(wasm),
        )
        overrides = r.overrides()
        if overrides:
            cmd += ["--overrides", ";".join(f"{k}={v}" for k, v in overrides.items())]
        log = self.ws.logs / "compile.log"
        run_logged("compile", cmd, log, cwd=tmp, env=link_environment(r.link_opt))
        if not wasm.is_file() or wasm.read_bytes()[:4] != b"\0asm":
            with open(log, "a") as handle:
                handle.write(f"llm2wasm: mlc_llm compile exited 0 but wrote no wasm module at {wasm}\n")
            raise StepFailed("compile", log)
        return {"memory": parse_memory(log.read_text(errors="replace")), "wgsl": self.check_wgsl(tmp, wasm)}

    def check_wgsl(self, tmp: Path, wasm: Path) -> dict:
        """Every WGSL kernel through Tint (Chrome's rules) before the library may leave; TVM's
        read_write defect repaired where found (llm2wasm.image.convert.wgsl). The library as compiled is
        kept beside it when a repair was made, for inspection."""
        original = tmp / f"{wasm.stem}.as-compiled.wasm"
        shutil.copyfile(wasm, original)
        report = tmp / "wgsl-check.json"
        cmd = [python_executable(), "-m", "llm2wasm.image.convert.wgsl", str(wasm), "--report", str(report)]
        if not self.request.repair_wgsl:
            cmd.append("--no-repair")
        log = self.ws.logs / "wgsl-check.log"
        try:
            run_logged("WGSL check", cmd, log)
        except StepFailed:
            raise StepFailed("compile (WGSL check: a kernel the browser would reject)", log) from None
        result = json.loads(report.read_text())
        report.unlink()
        if not result["repaired"]:
            original.unlink()
        else:
            say(f"  WGSL: {len(result['repaired'])} kernel(s) repaired (never-written buffers read-only); see {log}")
        return result
