"""llm2wasm tasks (invoke). Thin: each task parses flags and calls the tested package in src/.

invoke build [--profile P] [--until LAYER] [--set KEY=VALUE ...] [--dry-run]
invoke verify [--profile P] [--layer L]
invoke convert MODEL_DIR -q Q -o OUT [...]
invoke publish-bundle OUT --repo user/name [--dry-run]
invoke test | lint | layers | mirror | publish | doctor | clean
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

from invoke import Collection, Exit, Task
from invoke import task as invoke_task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))

from llm2wasm.errors import BuildFailed, UsageError  # noqa: E402

HELP_FLAGS = {"--help", "-h"}


def show_task_help(name: str) -> None:
    """invoke's own help of one task, as `invoke --help NAME` prints it."""
    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "--help", name], check=False)


def friendly(func):
    """Turn the package's errors into a one-line message and its exit status (2: bad input).

    Also answers `invoke TASK --help` for tasks with a positional argument: invoke hands `--help` to
    that argument as its value (`invoke convert --help` would look for a model folder named --help)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if any(isinstance(value, str) and value in HELP_FLAGS for value in (*args[1:], *kwargs.values())):
            show_task_help(func.__name__.replace("_", "-"))
            return None
        try:
            return func(*args, **kwargs)
        except UsageError as error:
            raise Exit(f"error: {error}", code=error.exit_code) from None
        except BuildFailed as error:
            raise Exit(f"build stopped at layer {error.layer!r}: {error.reason}", code=error.exit_code) from None

    return wrapper


class LetterFlagsTask(Task):
    """A task whose short flags are letters, never `h`: invoke gives an option the first character of
    its name no other option has taken, which for `--allow-pickle` in convert (a, l, o, w taken) or
    `--no-preflight` in build is `-`, shown and parsed as a flag `--`; and `h` would make `-h` of
    preview's --host, where everyone types `-h` for help. Such an option keeps its long name alone."""

    def arg_opts(self, name, default, taken_names):
        opts = super().arg_opts(name, default, taken_names)
        first, *short = opts["names"]
        opts["names"] = [first, *(flag for flag in short if flag.isalnum() and flag != "h")]
        return opts


def task(*args, **kwargs):
    """invoke's @task, every task a LetterFlagsTask."""
    kwargs.setdefault("klass", LetterFlagsTask)
    return invoke_task(*args, **kwargs)


PROFILE_HELP = "pin profile from images/pins.toml: stable (default), nightly, cpu, hermetic"
SET_HELP = "override one pin for this run, KEY=VALUE (repeatable), e.g. emsdk_version=3.1.56"


@task(
    help={
        "profile": PROFILE_HELP,
        "until": "stop after this layer (default: build every layer)",
        "set_": SET_HELP,
        "dry_run": "print the exact plan (images, build args, pin sources) and build nothing",
        "quiet": "show only progress lines; full output goes to .llm2wasm/logs/",
        "reverify": "run the checks even for images that already passed them",
        "no_cache": "build without Docker's cache (a cached step never sees a newer nightly wheel)",
        "repository": "image repository for the tags (default llm2wasm)",
        "images": "folder of layer Dockerfiles (default images/)",
        "report": "also write the build report (sizes, times, installed versions) to FILE.md or FILE.json",
        "no_preflight": "do not first check that every remote pin resolves (registry, wheel index, git, npm)",
        "no_selftest": "skip the real conversion in the final image (by hand only: such an image is not publishable)",
        "jobs": "layers built at once where the graph allows (default 2: the web toolchain beside the ML wheels)",
    },
    iterable=["set_"],
)
@friendly
def build(
    c,
    profile="stable",
    until=None,
    set_=None,
    dry_run=False,
    quiet=False,
    reverify=False,
    no_cache=False,
    repository="llm2wasm",
    images=None,
    report=None,
    no_preflight=False,
    no_selftest=False,
    jobs=2,
):
    """Build the layer graph; each layer is verified (testinfra) before any layer built on it.

    The final image counts as verified only after a real conversion in it (`llm2wasm selftest`)."""
    from llm2wasm.host.build import build_images
    from llm2wasm.host.pins import resolve_profile

    build_images(
        resolve_profile(profile, set_ or []),
        until=until,
        repository=repository,
        images_dir=Path(images) if images else None,
        dry_run=dry_run,
        quiet=quiet,
        reverify=reverify,
        no_cache=no_cache,
        report=Path(report) if report else None,
        preflight=not no_preflight,
        selftest=not no_selftest,
        jobs=int(jobs),
    )


@task(
    help={
        "profile": PROFILE_HELP,
        "layer": "check only this layer's image (default: every layer, top to bottom)",
        "set_": SET_HELP,
        "own_only": "run only the layer's own checks, not its parents' as well",
        "full": "run every parent's checks on every image, even where the layer changed nothing they look at",
        "repository": "image repository of the tags (default llm2wasm)",
        "selftest": "then run the build's last gate too: a real conversion in the app image (about a minute)",
        "keep": "with --selftest: keep what it made (tiny model, adapter, bundle, step logs) in KEEP/run",
    },
    iterable=["set_"],
)
@friendly
def verify(
    c,
    profile="stable",
    layer=None,
    set_=None,
    own_only=False,
    full=False,
    repository="llm2wasm",
    selftest=False,
    keep=None,
):
    """Run the testinfra checks on built images, on demand."""
    from llm2wasm.host.pins import resolve_profile
    from llm2wasm.host.verify import verify_images

    failed = verify_images(
        resolve_profile(profile, set_ or []),
        layer,
        repository=repository,
        own_only=own_only,
        full=full,
        selftest=selftest,
        keep=Path(keep) if keep else None,
    )
    if failed:
        raise Exit(f"checks failed for: {', '.join(failed)}", code=1)


@task(
    help={
        "model_dir": "Hugging Face model folder on this host (mounted read-only), or a Hub model id "
        "org/name[@revision], fetched on this host into the Hugging Face cache with your HF_TOKEN or `hf auth "
        "login` (the container never gets the token); a local path that exists wins over a Hub id (docs/HUB.md)",
        "quantization": "mlc_llm quantization for WebGPU: q4f16_1 (usual), q4f32_1, q3f16_1, q0f16, q0f32; or "
        "several, comma-separated (one fetch; a bundle each, OUT/<model>-<quantization>-MLC)",
        "output": "output folder on this host (the bundle; with several quantizations, the folder of the bundles); "
        "files are owned by you",
        "adapter": "PEFT adapter to merge first: a folder (mounted read-only) or a Hub id org/name[@revision], "
        "fetched on this host like the model",
        "conv_template": "mlc_llm conversation template (default: the one that renders like the model's chat template)",
        "model_id": "model_id in the WebLLM app config (default: the output folder's name)",
        "prefill_chunk_size": "prefill chunk size; 1024 avoids WebGPU buffer-size errors",
        "context_window": "context window size",
        "base_url": "absolute URL the bundle will be served from (default http://localhost:8000/)",
        "force": "replace an output folder that holds something else",
        "profile": "which built image to use (llm2wasm:app-PROFILE); default stable",
        "image": "run this image instead of llm2wasm:app-PROFILE",
        "cpu": "do not pass the GPU even when Docker has the NVIDIA runtime",
        "wgsl_repair": "repair TVM's read_write buffer defect in the library's shaders (default); --no-wgsl-repair "
        "fails on it instead (docs/CONVERT.md)",
        "device": "where the merge and weight conversion run: auto (default: the GPU when passed), cpu, cuda",
        "link_opt": "emcc's -O level at the library's link: O2 (default, about twice as fast) or O3 (TVM's own)",
        "peft_merge": "merge the adapter with peft's merge_and_unload (the whole model in memory) instead of "
        "tensor by tensor; what the streaming merge does not cover falls back to it by itself (docs/CONVERT.md)",
        "lib_cache": "the library cache shared by conversions, so fine-tunes of one base compile once "
        "(default: $LLM2WASM_LIB_CACHE, else ~/.cache/llm2wasm/libraries; docs/CONVERT.md)",
        "no_lib_cache": "compile the library even when the cache holds one of the same shape, settings and "
        "tools, and leave the cache alone",
        "skip_memory_check": "convert even when the estimate of the memory it needs exceeds what the container may "
        "use (the machine's memory less 1 GiB, or $LLM2WASM_MEMORY_LIMIT); the estimate is said either way "
        "(docs/CONVERT.md)",
        "allow_pickle": "a Hub model without safetensors: fetch its pytorch_model*.bin. Off by default: loading a "
        "pickle can run code from the repository (llm2wasm still inspects it opcode by opcode)",
    },
)
@friendly
def convert(
    c,
    model_dir,
    quantization=None,
    output=None,
    adapter=None,
    conv_template=None,
    model_id=None,
    prefill_chunk_size=None,
    context_window=None,
    base_url=None,
    force=False,
    profile="stable",
    image=None,
    cpu=False,
    wgsl_repair=True,
    device=None,
    link_opt=None,
    allow_pickle=False,
    peft_merge=False,
    lib_cache=None,
    no_lib_cache=False,
    skip_memory_check=False,
):
    """Convert a model (a folder or a Hub id, and optional PEFT adapter) into a WebLLM bundle, in the built image."""
    from llm2wasm.host.convertcommand import ConvertCommand, convert_command
    from llm2wasm.host.layers import FINAL_LAYER, get_layer
    from llm2wasm.host.librarycache import library_cache_for

    if not quantization or not output:
        raise UsageError(
            "convert needs --quantization (-q) and --output (-o): invoke convert MODEL_DIR -q q4f16_1 -o OUT"
        )
    command = ConvertCommand(
        model=model_dir,
        quantization=quantization,
        output=Path(output),
        image=image or get_layer(FINAL_LAYER).tag(profile),
        adapter=adapter,
        options=dict(
            conv_template=conv_template,
            model_id=model_id,
            prefill_chunk_size=prefill_chunk_size,
            context_window=context_window,
            base_url=base_url,
            device=device,
            link_opt=link_opt,
            force=force,
            no_wgsl_repair=not wgsl_repair,
            peft_merge=peft_merge,
            skip_memory_check=skip_memory_check,
        ),
        gpu=False if cpu else None,
        library_cache=library_cache_for(lib_cache, no_lib_cache),
        allow_pickle=allow_pickle,
    )
    status = convert_command(command)
    if status:
        raise Exit(code=status)


@task(
    help={
        "spec": "the batch spec (models.toml; docs/BATCH.md); its paths are relative to its folder",
        "output": "folder for the bundles (OUT/<model_id>/), the combined app-config.json and batch-report.json",
        "jobs": "items converted at once (default: one per core, at most one per 8 GiB of memory)",
        "matrix": "print the GitHub Actions matrix of the items (JSON) and run nothing",
        "k8s": "print a Kubernetes Indexed Job (YAML) whose pod N converts item N, and run nothing",
        "claim": "--k8s: the PersistentVolumeClaim holding the models (the spec's folder) and outputs (out/)",
        "parallelism": "--k8s: pods at once (default 2)",
        "profile": "which built image to use (llm2wasm:app-PROFILE); default stable",
        "image": "run (or, with --k8s, name) this image instead of llm2wasm:app-PROFILE",
        "cpu": "do not pass the GPU even when Docker has the NVIDIA runtime",
        "lib_cache": "the library cache shared by conversions, so fine-tunes of one base compile once "
        "(default: $LLM2WASM_LIB_CACHE, else ~/.cache/llm2wasm/libraries; docs/CONVERT.md)",
        "no_lib_cache": "compile the library even when the cache holds one of the same shape, settings and "
        "tools, and leave the cache alone",
        "allow_pickle": "Hub items (hub =, adapter_hub =) without safetensors: fetch their pytorch_model*.bin. "
        "Off by default, and only here, never in the spec: loading a pickle can run code from the repository",
    }
)
@friendly
def batch(
    c,
    spec,
    output=None,
    jobs=None,
    matrix=False,
    k8s=False,
    claim="llm2wasm-batch",
    parallelism=2,
    profile="stable",
    image=None,
    cpu=False,
    lib_cache=None,
    no_lib_cache=False,
    allow_pickle=False,
):
    """Convert every item of a batch spec in the built image, a few at a time; one app config for all."""
    from llm2wasm.host.batchrun import batch_command
    from llm2wasm.host.layers import FINAL_LAYER, get_layer
    from llm2wasm.host.librarycache import library_cache_for

    failed = batch_command(
        Path(spec),
        Path(output) if output else None,
        image or get_layer(FINAL_LAYER).tag(profile),
        jobs=None if jobs is None else int(jobs),
        gpu=False if cpu else None,
        matrix=matrix,
        k8s=k8s,
        claim=claim,
        parallelism=int(parallelism),
        library_cache=None if matrix or k8s else library_cache_for(lib_cache, no_lib_cache),
        allow_pickle=allow_pickle,
    )
    if failed:
        raise Exit(f"{failed} item(s) failed; their logs are in {Path(output) / '.batch'}/", code=1)


@task(
    help={
        "bundle": "a bundle made by `invoke convert` (its output folder), or a published model_list entry "
        "(webllm-model-record.json of `invoke publish-bundle`, a file): the page then loads the model from the "
        "entry's URLs, as any WebLLM app given it does (docs/HUB.md)",
        "port": "port on this machine (default 8000)",
        "host": "address on this machine to publish the port on (default 127.0.0.1)",
        "public-url": "the URL browsers open, e.g. http://my-box.lan:8000/ with --host 0.0.0.0 (the server "
        "answers to that host only; default http://127.0.0.1:PORT/)",
        "profile": "which built image to use (default stable)",
        "image": "run this image instead of llm2wasm:app-PROFILE",
    }
)
@friendly
def preview(c, bundle, port=8000, host="127.0.0.1", profile="stable", image=None, public_url=None):
    """Serve a bundle, or a published model_list entry, with a chat page that runs it in WebLLM; open the URL."""
    from llm2wasm.host.layers import FINAL_LAYER, get_layer
    from llm2wasm.host.run import PreviewJob, run_preview_job

    published = Path(bundle).is_file()  # a file: a published entry; anything else: a bundle folder
    job = PreviewJob(
        image=image or get_layer(FINAL_LAYER).tag(profile),
        bundle=None if published else Path(bundle),
        record=Path(bundle) if published else None,
        port=int(port),
        host=host,
        public_url=public_url,
    )
    sys.exit(run_preview_job(job))


@task(
    help={
        "bundle": "a bundle made by `invoke convert` (its output folder)",
        "repo": "the Hub model repository to publish to, namespace/name (created when missing), e.g. "
        "you/Qwen2.5-0.5B-Instruct-q4f16_1-MLC: one repository per quantization, as WebLLM's own",
        "revision": "the branch to commit to (default main); the published URLs name it",
        "dry_run": "list what would be sent (and what the Hub already holds) and the entry; send nothing "
        "(no token needed)",
        "private": "create the repository private (only when it does not exist yet; WebLLM apps of others cannot "
        "then load it)",
        "endpoint": "the Hub's address (default: HF_ENDPOINT, else https://huggingface.co)",
        "license": "the card's license when the base model names none (a model converted from a local folder)",
        "profile": "the profile whose pinned WebLLM version the card names as tested (the one `invoke preview` runs)",
    }
)
@friendly
def publish_bundle(
    c, bundle, repo=None, revision="main", dry_run=False, private=False, endpoint=None, license=None, profile="stable"
):
    """Publish a bundle to a Hugging Face model repository, with a model card and a ready WebLLM model_list entry.

    The weights and the library (named as WebLLM names its own) go to the repository root; files the
    Hub already holds with the same content are not sent again. The token: HF_TOKEN or `hf auth login`."""
    from llm2wasm.host.hubpublishcommand import publish_command, webllm_version_of
    from llm2wasm.host.pins import resolve_profile

    if not repo:
        raise UsageError("publish-bundle needs --repo: invoke publish-bundle OUT --repo you/Model-q4f16_1-MLC")
    publish_command(
        Path(bundle),
        repo,
        webllm_version=webllm_version_of(resolve_profile(profile)),
        revision=revision,
        dry_run=dry_run,
        private=private or None,
        endpoint=endpoint,
        license=license,
    )


@task(
    help={
        "profile": PROFILE_HELP,
        "to": "target repository, e.g. ghcr.io/OWNER/llm2wasm",
        "set_": SET_HELP,
        "no_push": "only tag locally",
        "repository": "local repository of the built images (default llm2wasm)",
    },
    iterable=["set_"],
)
@friendly
def publish(c, to, profile="stable", set_=None, no_push=False, repository="llm2wasm"):
    """Tag the verified final image from its contents (python, mlc-llm, emsdk, commit, date) and push it."""
    import time

    from llm2wasm.host.pins import resolve_profile
    from llm2wasm.host.plan import git_revision
    from llm2wasm.host.publish import publish as publish_image

    revision, _ = git_revision()
    refs = publish_image(
        resolve_profile(profile, set_ or []),
        to,
        local_repository=repository,
        revision=revision,
        date=time.strftime("%Y%m%d", time.gmtime()),
        push=not no_push,
    )
    print("\n".join(refs))


@task(
    help={
        "profile": "also check that every remote pin of this profile resolves (registry, wheel index, git, npm)",
        "set_": SET_HELP,
    },
    iterable=["set_"],
)
@friendly
def doctor(c, profile=None, set_=None):
    """Check this host for Docker, buildx, the NVIDIA runtime and free disk; with --profile, its pins too.

    The pins' check is the preflight `invoke build` runs first (every remote pin resolves); each
    problem is printed with its fix."""
    from llm2wasm.host.doctor import doctor_command
    from llm2wasm.host.pins import resolve_profile

    status = doctor_command(ROOT, resolve_profile(profile, set_ or []) if profile else None)
    if status == 2:
        raise Exit("doctor: pins do not resolve (see the fixes above)", code=2)
    if status:
        raise Exit("doctor found problems (see the fixes above)", code=1)


@task(
    help={
        "profile": "remove this profile's images (default: every profile)",
        "lib_cache": "empty the library cache instead ($LLM2WASM_LIB_CACHE, else ~/.cache/llm2wasm/libraries); "
        "images are kept",
    }
)
def clean(c, profile=None, lib_cache=False):
    """Remove llm2wasm's images and its build records; or, with --lib-cache, empty the library cache.

    The images: llm2wasm:* and the failed layers kept in llm2wasm-failed:*; the records: build logs
    and verification results in .llm2wasm/. The library cache's size is shown either way."""
    from llm2wasm.host import librarycache
    from llm2wasm.host.build import remove_images

    folder = librarycache.default_library_cache()
    if lib_cache:
        print(librarycache.empty(folder))
        return
    remove_images(profile)
    print("removed llm2wasm images and .llm2wasm/")
    print(f"{librarycache.describe(folder)} (kept; `invoke clean --lib-cache` empties it)")


@task(help={"json": "print the registry as JSON (what CI reads)"})
def layers(c, json=False):
    """List the layers in build order."""
    from llm2wasm.host.layers import LAYERS, registry_json

    if json:
        print(registry_json())
        return
    for layer in LAYERS:
        print(f"{layer.name:12} <- {layer.parent or '(pin base_image)':12} {layer.summary}")


@task
def lint(c):
    """ruff on the code and hadolint on every Dockerfile (the workflows are checked in tests/unit)."""
    from llm2wasm.host.layers import LAYERS

    tools = Path(sys.executable).parent  # the venv's own tools, activated or not
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m ruff format --check .")
    dockerfiles = " ".join(str(layer.dockerfile.relative_to(ROOT)) for layer in LAYERS)
    c.run(f"{tools / 'hadolint'} --config .hadolint.yaml {dockerfiles} bench/seed-equivalent/Dockerfile")


@task(help={"unit": "only the unit tests (no Docker engine needed)", "k": "pytest -k expression"})
def test(c, unit=False, k=None):
    """Run the test suite: unit tests, then integration tests on the hermetic mirror."""
    args = ["-m", "'not integration'"] if unit else []
    if k:
        args += ["-k", f"'{k}'"]
    c.run(f"{sys.executable} -m pytest {' '.join(args)}", pty=False)


@task(
    help={
        "profile": "which built image to check (default stable)",
        "image": "check this image instead of llm2wasm:app-PROFILE",
        "keep": "keep the model, bundle, conversion log and browser record in this folder (default: a temporary one)",
        "summary": "also append the result as Markdown to FILE (e.g. $GITHUB_STEP_SUMMARY)",
        "screenshot": "save a screenshot of the preview page to FILE.png",
        "quantization": "q0f32 (default) or q4f32_1: what software WebGPU runs and the reference can compute",
    }
)
@friendly
def browser_check(c, profile="stable", image=None, keep=None, summary=None, screenshot=None, quantization="q0f32"):
    """Prove the image in a browser: WebLLM's greedy tokens of a bundle it made equal transformers'.

    A tiny model is made in the image, converted (q0f32, or q4f32_1 with --quantization) and run in
    WebLLM in headless Chromium (WebGPU on the CPU); exit 1 when the tokens differ or the browser
    reports an error."""
    from llm2wasm.host.browsercheck import BrowserCheckFailed, browser_check_command
    from llm2wasm.host.layers import FINAL_LAYER, get_layer

    image = image or get_layer(FINAL_LAYER).tag(profile)
    try:
        passed = browser_check_command(
            image,
            Path(keep).resolve() if keep else None,
            screenshot=Path(screenshot) if screenshot else None,
            summary=Path(summary) if summary else None,
            quantization=quantization,
        )
    except BrowserCheckFailed as error:
        raise Exit(f"browser check of {image}: {error}", code=1) from None
    if not passed:
        raise Exit(f"browser check of {image} FAILED", code=1)


@task(
    help={
        "profile": PROFILE_HELP,
        "find_links": "also look for wheels in this folder (default for hermetic: the mirror's wheelhouse)",
    }
)
@friendly
def lock(c, profile="stable", find_links=None):
    """Write the profile's hash lock of the ml layer's requirements (images/ml/locks/, pin ml_lock).

    Run it after changing torch/transformers/peft/bitsandbytes pins; the build refuses a lock that
    no longer matches them."""
    from llm2wasm.host.locks import compile_lock, lock_path
    from llm2wasm.host.pins import resolve_profile

    pins = resolve_profile(profile)
    target = lock_path(ROOT, pins)
    if target is None:
        raise UsageError(f"profile {profile} has no ml_lock pin: name a file of images/ml/locks/ in images/pins.toml")
    if find_links is None and profile == "hermetic":
        sys.path.insert(0, str(ROOT / "tests" / "hermetic"))
        import mirror as hermetic_mirror

        find_links = hermetic_mirror.cache_dir() / "wheelhouse"
    compile_lock(pins, target, find_links=Path(find_links) if find_links else None)
    print(f"wrote {target.relative_to(ROOT)}")


MIRROR_ACTIONS = ("up", "down", "status")


@task(help={"action": "up (start it, building what it serves the first time), down or status"})
@friendly
def mirror(c, action):
    """Start or stop the hermetic local mirror (wheelhouse, git repositories, Debian base image).

    The hermetic profile builds from it alone: `invoke mirror up` before `invoke build --profile hermetic`."""
    if action not in MIRROR_ACTIONS:
        raise UsageError(f"invoke mirror {action!r}: the action is one of {', '.join(MIRROR_ACTIONS)}")
    c.run(f"{sys.executable} {ROOT / 'tests' / 'hermetic' / 'mirror.py'} {action}")


ns = Collection(
    build,
    verify,
    convert,
    batch,
    preview,
    browser_check,
    publish,
    publish_bundle,
    layers,
    lint,
    test,
    mirror,
    doctor,
    clean,
    lock,
)
