"""Which steps of a conversion run, and when: the resumable run of llm2wasm.image.convert.steps.

A step runs unless an earlier run finished it with the same key (step_keys: its inputs, its
settings and the versions of the tools it runs; llm2wasm.image.convert.workspace keeps the
record), so an interrupted conversion resumes after its last finished step, and a re-run with other
tools (a newer image) makes again what they make. Weight conversion and compilation both need only
the generated config, so they run at once. A compile whose library the shared library cache holds
(same shape, settings and tools: another fine-tune of the same base) copies it instead. Apart from
the steps' own actions, which know nothing of keys, order, threads or caches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm2wasm.image.convert.hfconfig import ModelConfigAdapter, longrope_beyond_original_context
from llm2wasm.image.convert.inputs import ConvertRequest, fingerprint
from llm2wasm.image.convert.libcache import EntryChanged, LibraryCache, library_key
from llm2wasm.image.convert.progress import say
from llm2wasm.image.convert.steps import ConversionSteps
from llm2wasm.image.convert.toolchain import Toolchain, changes, installed_toolchain
from llm2wasm.image.convert.workspace import key_of


class Converter(ConversionSteps):
    """One conversion's run: each step in its turn, or what an earlier run made of it."""

    def __init__(
        self,
        request: ConvertRequest,
        model_config: ModelConfigAdapter | None = None,
        toolchain: Toolchain | None = None,
    ):
        super().__init__(request, model_config)
        self.timings: dict[str, str] = {}
        self._toolchain = toolchain

    @property
    def toolchain(self) -> Toolchain:
        if self._toolchain is None:
            self._toolchain = installed_toolchain()
        return self._toolchain

    # -- one step, or what an earlier run made of it ------------------------------------------
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
            adapter_fingerprint = fingerprint(r.adapter_files, say)
            merge_key = key_of(model_fingerprint, adapter_fingerprint, r.peft_merge, self.toolchain.of("merge"))
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
                pool.submit(self.step, "compile", keys["compile"], self.compile_or_reuse),
            ]
            errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error
        self.assemble()

    # -- the library: compiled, or the one the shared library cache holds for this shape ------
    def library_cache(self) -> LibraryCache | None:
        return LibraryCache.from_environment() if self.request.use_lib_cache else None

    def compile_or_reuse(self, tmp: Path) -> dict:
        """The library from the library cache (llm2wasm.image.convert.libcache) when it holds one made
        from the same shape, settings and tools; else compiled, and filed there for the next fine-tune
        of this base. The cache never fails a conversion: a bad entry is a miss, a failed store a note."""
        cache = self.library_cache()
        if cache is None:
            return self.compile(tmp)
        r = self.request
        chat_config = json.loads((self.ws.root / "gen_config" / "config" / "mlc-chat-config.json").read_text())
        key, inputs = library_key(
            chat_config,
            quantization=r.quantization,
            compile_options={"overrides": r.overrides(), "repair_wgsl": r.repair_wgsl, "link_opt": r.link_opt},
            toolchain=self.toolchain.of("compile"),
        )
        waiting = f"  library {key}: another conversion is compiling it; waiting for it"
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(cache.compiling(key, on_wait=lambda: say(waiting)))
            except (OSError, ValueError) as error:  # the cache folder itself is unusable
                say(f"  library cache {cache.root}: {error}: compiling without it")
                return self.compile(tmp)
            return self._reuse_or_compile(tmp, cache, key, inputs)

    def _reuse_or_compile(self, tmp: Path, cache: LibraryCache, key: str, inputs: dict) -> dict:
        wasm = tmp / f"{self.request.model_id}.wasm"
        entry = cache.lookup(key, on_reject=lambda why: say(f"  {why}: compiling instead"))
        if entry is not None:
            try:
                cache.copy_into(entry, wasm)
            except (EntryChanged, OSError) as error:
                say(f"  library cache entry {key}: {error}: compiling instead")
            else:
                say(f"  library: reused from the library cache (key {key}, compiled {entry.created}); "
                    "--no-lib-cache compiles it")  # fmt: skip
                return {"memory": entry.memory, "wgsl": entry.wgsl_result, "library_cache": {"key": key, "hit": True}}
        result = self.compile(tmp)
        try:
            cache.store(key, inputs, wasm, result["wgsl"], result["memory"])
        except (OSError, ValueError) as error:
            say(f"  library cache: the library was not filed in {cache.root}: {error}")
        else:
            say(f"  library: filed in the library cache (key {key})")
        return {**result, "library_cache": {"key": key, "hit": False}}

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
