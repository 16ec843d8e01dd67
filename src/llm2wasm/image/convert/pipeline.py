"""`llm2wasm convert`: [merge PEFT] -> gen_config -> (convert_weight || compile) -> WebLLM bundle.

Every step writes into a temporary folder under OUT/.llm2wasm/ and is moved into place only when
it finished; OUT/.llm2wasm/state.json records each finished step with a key of its inputs and of
the tools it ran (llm2wasm.image.convert.toolchain). A re-run skips steps whose key is unchanged, so an
interrupted conversion resumes after its last finished step, and a re-run with other tools (a newer
image) makes again what they make. Weight conversion and compilation both need only the generated
config, so they run at once.

Bundle layout (what WebLLM fetches):
    OUT/model/resolve/main/   mlc-chat-config.json, tokenizer files, tensor-cache.json, params_shard_*.bin
    OUT/lib/MODEL_ID.wasm     the WebGPU model library
    OUT/app-config.json       a WebLLM AppConfig with one ModelRecord
    OUT/README.md             how to serve it
WebLLM appends `resolve/main/` to a model URL without `/resolve/<rev>/`; serving OUT as it is, the
model URL BASE_URL/model/ therefore reaches OUT/model/resolve/main/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm2wasm import __version__
from llm2wasm.errors import UsageError
from llm2wasm.image.convert.chat import (
    choose,
    has_chat_template,
    render_mlc_templates,
    render_model_template,
    stop_token_ids,
    tokenizer_dir,
)
from llm2wasm.image.convert.device import choose_device, is_out_of_memory
from llm2wasm.image.convert.hfconfig import (
    HfView,
    ModelConfigAdapter,
    longrope_beyond_original_context,
    parity_mismatches,
)
from llm2wasm.image.convert.inputs import ConvertRequest, build_request, fingerprint, guess_template, warn
from llm2wasm.image.convert.mlc import installed_names, mlc_command, parse_memory, python_executable
from llm2wasm.image.convert.outputlock import output_lock
from llm2wasm.image.convert.toolchain import Toolchain, changes, installed_toolchain
from llm2wasm.image.hostpaths import show_as

STATE_DIR = ".llm2wasm"
STATE_FILE = "state.json"
HEARTBEAT_SECONDS = 30.0
_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(message, file=sys.stderr, flush=True)


def remove(path: Path) -> None:
    """Remove a file, a symlink (not what it points at) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def is_previous_bundle(output: Path) -> bool:
    return (output / STATE_DIR / STATE_FILE).is_file()


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepFailed(Exception):
    def __init__(self, step: str, log: Path):
        self.step, self.log = step, log
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
        super().__init__(f"step {step} failed; last lines of {log}:\n{tail}")


class Workspace:
    """OUT/.llm2wasm: finished step outputs, their keys, logs and in-progress temporaries."""

    def __init__(self, output: Path):
        self.root = output / STATE_DIR
        self.state_path = self.root / STATE_FILE
        self.logs = self.root / "logs"
        try:
            self.state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.state = {"llm2wasm": __version__}
        self.state.setdefault("steps", {})

    def prepare(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("tmp-*"):  # an interrupted step's partial output
            remove(leftover)
        self.save()

    def save(self) -> None:
        with _print_lock:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2))
            tmp.replace(self.state_path)

    def done(self, step: str, key: str) -> bool:
        record = self.state["steps"].get(step)
        return bool(record) and record["key"] == key and (self.root / step).exists()

    def finish(self, step: str, key: str, tmp: Path, seconds: float, extra: dict | None = None) -> None:
        target = self.root / step
        if target.exists():
            remove(target)
        tmp.replace(target)
        self.state["steps"][step] = {"key": key, "seconds": round(seconds, 2), **(extra or {})}
        self.save()

    def temp_dir(self, step: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"tmp-{step}-", dir=self.root))


def run_logged(
    step: str, cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    """Run a step's command, output to its log, a heartbeat on the terminal while it runs."""
    started = time.monotonic()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        while True:
            try:
                status = proc.wait(timeout=HEARTBEAT_SECONDS)
                break
            except subprocess.TimeoutExpired:
                say(f"  … {step} running, {time.monotonic() - started:.0f}s so far (log: {log})")
    if status != 0:
        raise StepFailed(step, log)


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


class Converter:
    def __init__(
        self,
        request: ConvertRequest,
        model_config: ModelConfigAdapter | None = None,
        toolchain: Toolchain | None = None,
    ):
        self.request = request
        self.model_config = model_config or ModelConfigAdapter()
        self.hf: HfView | None = None
        self.ws = Workspace(request.output)
        self.timings: dict[str, str] = {}
        self._device: str | None = None
        self._toolchain = toolchain

    @property
    def toolchain(self) -> Toolchain:
        if self._toolchain is None:
            self._toolchain = installed_toolchain()
        return self._toolchain

    # -- steps ----------------------------------------------------------------------------
    def step(self, name: str, key: str, action) -> None:
        """Run `action` as step `name` unless an earlier run finished it with the same key (which
        covers the step's tools: `step_keys`)."""
        if self.ws.done(name, key):
            say(f"✓ {name}: unchanged inputs, kept from an earlier run")
            self.timings[name] = "kept"
            return
        tools = self.toolchain.of(name)
        previous = self.ws.state["steps"].get(name, {}).get("tools")
        changed = changes(previous, tools) if previous else []
        say(f"→ {name} … (made again: {'; '.join(changed)})" if changed else f"→ {name} …")
        started, started_at = time.monotonic(), time.time()
        tmp = self.ws.temp_dir(name)
        try:
            extra = action(tmp) or {}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        # wall-clock start and end, so a reader can see which steps ran side by side
        extra = {"started": round(started_at, 3), "finished": round(time.time(), 3), "tools": tools, **extra}
        self.ws.finish(name, key, tmp, seconds, extra)
        self.timings[name] = f"{seconds:.1f}s"
        say(f"✓ {name} done in {seconds:.1f}s")

    def merge(self, tmp: Path) -> None:
        from llm2wasm.image.convert.merge import merge_adapter

        log = self.ws.logs / "merge.log"
        device = self.device()
        try:
            merge_adapter(self.request.model_view, self.request.adapter_view, tmp / "model", log, device)
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

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> None:
        self.request.output.mkdir(parents=True, exist_ok=True)
        self.ws.prepare()
        try:
            self._run_steps()
        finally:
            # The symlink view points at paths that exist only inside the container; it is
            # rebuilt on every run, so nothing of it is left in the user's folder.
            shutil.rmtree(self.ws.root / "source", ignore_errors=True)

    def _run_steps(self) -> None:
        r = self.request
        model_fingerprint = fingerprint(r.model_files, say)
        if r.adapter is not None:
            merge_key = key_of(model_fingerprint, fingerprint(r.adapter_files, say), self.toolchain.of("merge"))
            self.step("merge", merge_key, self.merge)
            source_key = key_of(merge_key, self.prepare_source(self.ws.root / "merge" / "model"))
        else:
            source_key = key_of(model_fingerprint, self.prepare_source(r.model_view))
        keys = step_keys(r, source_key, self.toolchain)
        self.step("gen_config", keys["gen_config"], self.gen_config)
        self.warn_about_context()
        # Both need only the generated config: run them at the same time.
        # LLM2WASM_STEP_WORKERS=1 runs them one after the other (for comparison, bench/bench.py).
        with ThreadPoolExecutor(max_workers=int(os.environ.get("LLM2WASM_STEP_WORKERS", "2"))) as pool:
            futures = [
                pool.submit(self.step, "convert_weight", keys["convert_weight"], self.convert_weight),
                pool.submit(self.step, "compile", keys["compile"], self.compile),
            ]
            errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error
        self.assemble()

    def warn_about_context(self) -> None:
        """Said on every run (gen_config may be kept), from the context window mlc_llm settled on."""
        chat_config = json.loads((self.ws.root / "gen_config" / "config" / "mlc-chat-config.json").read_text())
        warning = longrope_beyond_original_context(self.hf, chat_config.get("context_window_size"))
        if warning:
            say(f"llm2wasm: warning: {warning}")

    def assemble(self) -> None:
        from llm2wasm.image.convert.bundle import write_bundle

        write_bundle(self.request, self.ws.root, self.ws.state["steps"].get("compile", {}).get("memory", {}))


def step_keys(r: ConvertRequest, source_key: str, toolchain: Toolchain) -> dict[str, str]:
    """The keys of the steps after the source is laid out: what each step's output depends on, its
    settings and the versions of the tools it runs. A key that is unchanged keeps the step's output."""
    names_key = key_of(r.quantization, r.conv_template, r.system_message, r.context_window, r.prefill_chunk_size)
    config_key = key_of(source_key, names_key, toolchain.of("gen_config"))
    return {
        "gen_config": config_key,
        "convert_weight": key_of(source_key, r.quantization, toolchain.of("convert_weight")),
        "compile": key_of(config_key, r.model_id, r.overrides(), r.repair_wgsl, r.link_opt, toolchain.of("compile")),
    }


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
    converter.device()  # `--device cuda` without a GPU is bad input too
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
