"""The docker command `invoke convert` runs (no engine needed: the image lookup is replaced)."""

from __future__ import annotations

import json

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import run as run_module
from llm2wasm.host.run import ConvertJob, docker_command


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def image_present(monkeypatch):
    monkeypatch.setattr(run_module.docker, "image_id", lambda ref: "sha256:x")


def mounts(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--mount"]


def test_mounts_user_and_no_token(monkeypatch, tmp_path, model, image_present):
    """A token in the caller's environment never reaches the container: it has no network, so the
    token has no use there, and a hostile model folder could copy it into the bundle."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret_value")
    cmd, where = docker_command(
        ConvertJob(
            image="img",
            model_dir=model,
            output=tmp_path / "o",
            quantization="q4f16_1",
            gpu=True,
            user="1000:1000",
            options=["--conv-template", "llama-3"],
        )
    )
    assert "hf_secret_value" not in " ".join(cmd)
    passed = [cmd[i + 1].split("=")[0] for i, a in enumerate(cmd) if a == "-e"]
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & set(passed)
    assert cmd[cmd.index("--user") + 1] == "1000:1000" and "--gpus" in cmd and "on the GPU" in where
    # OUT mounted under its own name: the bundle's model id and library are named after it
    assert mounts(cmd) == [
        f"type=bind,source={model.resolve()},target=/input/model,readonly",
        f"type=bind,source={(tmp_path / 'o').resolve()},target=/output/o",
    ]
    assert cmd[cmd.index("img") + 1 :] == [
        "convert",
        "/input/model",
        "--quantization",
        "q4f16_1",
        "-o",
        "/output/o",
        "--conv-template",
        "llama-3",
    ]
    # the container's messages name the host's folders
    shown = json.loads(next(a for a in cmd if a.startswith("LLM2WASM_HOST_PATHS=")).split("=", 1)[1])
    assert shown == {"/output/o": str((tmp_path / "o").resolve()), "/input/model": str(model.resolve())}


def test_cpu_said_and_no_token_when_unset(monkeypatch, tmp_path, model, image_present):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    cmd, where = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q4f16_1", gpu=False)
    )
    assert "--gpus" not in cmd and "on the CPU" in where
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & {cmd[i + 1] for i, a in enumerate(cmd) if a == "-e"}


def test_missing_inputs_are_usage_errors(monkeypatch, tmp_path, model):
    monkeypatch.setattr(run_module.docker, "image_id", lambda ref: None)
    with pytest.raises(UsageError, match=r"has no config\.json"):
        docker_command(ConvertJob(image="img", model_dir=tmp_path, output=tmp_path / "o", quantization="q"))
    with pytest.raises(UsageError, match=r"has no adapter_config\.json"):
        docker_command(
            ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", adapter=tmp_path)
        )
    with pytest.raises(UsageError, match=r"image img not found: build it with `invoke build`"):
        docker_command(ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q"))
    # llm2wasm's own image names the profile that builds it: a bare `invoke build` makes another
    with pytest.raises(
        UsageError, match=r"image llm2wasm:app-cpu not found: build it with `invoke build --profile cpu`"
    ):
        docker_command(ConvertJob(image="llm2wasm:app-cpu", model_dir=model, output=tmp_path / "o", quantization="q"))


def test_container_paths_shown_as_host_paths(monkeypatch, capsys):
    from llm2wasm.image import hostpaths

    monkeypatch.setenv(hostpaths.HOST_PATHS_VARIABLE, json.dumps({"/output/foo": "/home/u/dist/foo", "/output": "/x"}))
    monkeypatch.setattr(hostpaths.sys, "stderr", hostpaths.sys.stderr)
    hostpaths.show_host_paths_on_stderr()
    print("Bundle in /output/foo; log /output/foo/.llm2wasm/logs/compile.log", file=hostpaths.sys.stderr)
    assert capsys.readouterr().err == "Bundle in /home/u/dist/foo; log /home/u/dist/foo/.llm2wasm/logs/compile.log\n"


def test_the_container_runs_with_the_least_it_needs(tmp_path, model, image_present):
    cmd, _ = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=False)
    )
    head = cmd[: cmd.index("img")]
    assert head[head.index("--network") + 1] == "none"
    assert head[head.index("--cap-drop") + 1] == "ALL"
    assert head[head.index("--security-opt") + 1] == "no-new-privileges"
    assert int(head[head.index("--pids-limit") + 1]) > 0
    assert "--init" in head and "-v" not in head and "--privileged" not in head
    assert "--read-only" in head and head[head.index("--tmpfs") + 1] == "/tmp:rw,nosuid,nodev,noexec"


def test_with_the_gpu_the_root_stays_writable_for_the_nvidia_hook(tmp_path, model, image_present):
    cmd, _ = docker_command(ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=True))
    head = cmd[: cmd.index("img")]
    assert "--gpus" in head and "--read-only" not in head
    assert head[head.index("--cap-drop") + 1] == "ALL"


def test_a_path_with_colon_or_comma_is_mounted_as_itself(tmp_path, image_present):
    """`-v a:b:c` would read a path with ':' as a volume spec (Docker: "invalid volume
    specification", exit 125); --mount takes CSV fields, quoted where the path has a comma."""
    model = tmp_path / "my:model,v2"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cmd, _ = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=False)
    )
    import csv

    fields = next(csv.reader([mounts(cmd)[0]]))
    assert fields == ["type=bind", f"source={model}", "target=/input/model", "readonly"]


@pytest.mark.parametrize(
    "make_output,message",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is a file: pass a folder"),
        (lambda tmp: (tmp / "dangling").symlink_to(tmp / "nowhere") or tmp / "dangling", "which does not exist"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "out", "is a file, not a folder"),
    ],
)
def test_bad_output_folders_are_usage_errors(tmp_path, model, image_present, make_output, message):
    output = make_output(tmp_path)
    with pytest.raises(UsageError, match=message):
        docker_command(ConvertJob(image="img", model_dir=model, output=output, quantization="q", gpu=False))


def test_a_stopped_engine_is_not_a_missing_image(monkeypatch):
    from subprocess import CompletedProcess

    down = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
    monkeypatch.setattr(run_module.docker, "run", lambda args, **kw: CompletedProcess(args, 1, "", down))
    with pytest.raises(UsageError, match="the Docker engine is not reachable"):
        run_module.docker.image_id("llm2wasm:app-stable")
    monkeypatch.setattr(
        run_module.docker, "run", lambda args, **kw: CompletedProcess(args, 1, "", "Error: No such image: x")
    )
    assert run_module.docker.image_id("x") is None


def test_a_view_folder_is_shown_as_the_users_folder(monkeypatch, capsys):
    """The converter reads through a view of its own; its messages name the user's folder, and the
    container's mount point is then shown as the host's path as before."""
    from llm2wasm.image import hostpaths

    monkeypatch.setenv(hostpaths.HOST_PATHS_VARIABLE, json.dumps({"/input/model": "/home/u/my-model"}))
    monkeypatch.setattr(hostpaths.sys, "stderr", hostpaths.sys.stderr)
    hostpaths.show_host_paths_on_stderr()
    hostpaths.show_as("/tmp/llm2wasm-inputs-x/model", "/input/model")
    print("cannot read /tmp/llm2wasm-inputs-x/model/config.json", file=hostpaths.sys.stderr)
    assert capsys.readouterr().err == "cannot read /home/u/my-model/config.json\n"


def test_a_conversion_cannot_take_all_of_the_machines_memory(tmp_path, model, image_present):
    """Running out kills the conversion's container (exit 137), not the host's other processes."""
    cmd, _ = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=False)
    )
    head = cmd[: cmd.index("img")]
    total = run_module.os.sysconf("SC_PAGE_SIZE") * run_module.os.sysconf("SC_PHYS_PAGES")
    limit = int(head[head.index("--memory") + 1])
    assert limit == max(2 * 2**30, total - 2**30) and head[head.index("--memory-swap") + 1] == str(limit)


def test_a_smaller_memory_limit_is_the_users_choice(tmp_path, model, image_present, monkeypatch):
    monkeypatch.setenv(run_module.MEMORY_LIMIT_VARIABLE, "8g")
    cmd, _ = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=False)
    )
    assert cmd[cmd.index("--memory") + 1] == str(8 * 2**30) == cmd[cmd.index("--memory-swap") + 1]
    assert run_module.memory_limit_source() == "LLM2WASM_MEMORY_LIMIT"


@pytest.mark.parametrize(
    ("text", "size"),
    [("8g", 8 * 2**30), ("8G", 8 * 2**30), ("8GiB", 8 * 2**30), ("16384m", 16 * 2**30), ("1.5g", 3 * 2**29),
     (str(2**31), 2**31), ("2147483648b", 2**31)],
)  # fmt: skip
def test_memory_sizes_are_read_as_docker_reads_them(text, size):
    assert run_module.parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8x", "g", "-8g", "512m", "0"])
def test_a_memory_limit_that_is_no_size_or_too_small_is_refused_with_exit_2(text, tmp_path, model, image_present,
                                                                            monkeypatch):  # fmt: skip
    monkeypatch.setenv(run_module.MEMORY_LIMIT_VARIABLE, text)
    with pytest.raises(UsageError, match="LLM2WASM_MEMORY_LIMIT") as refused:
        run_module.run_convert_job(
            ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=False)
        )
    assert refused.value.exit_code == 2 and not (tmp_path / "o").exists()  # nothing created


def test_convert_options_pass_values_and_flags_and_leave_out_the_rest():
    assert run_module.convert_options(
        conv_template="chatml", model_id=None, context_window=4096, force=True, no_wgsl_repair=False
    ) == ["--conv-template", "chatml", "--context-window", "4096", "--force"]
    assert run_module.convert_options(no_wgsl_repair=True, link_opt="O3") == ["--no-wgsl-repair", "--link-opt", "O3"]


def test_every_option_the_convert_task_passes_is_one_the_image_command_takes():
    from llm2wasm.image.convert.command import convert_parser

    options = run_module.convert_options(
        conv_template="chatml",
        model_id="m",
        prefill_chunk_size=1024,
        context_window=4096,
        base_url="https://example.com/",
        device="cpu",
        link_opt="O3",
        force=True,
        no_wgsl_repair=True,
    )
    parsed = convert_parser().parse_args(["/input/model", "-q", "q4f16_1", "-o", "/output/x", *options])
    assert (parsed.conv_template, parsed.model_id, parsed.prefill_chunk_size, parsed.context_window) == (
        "chatml",
        "m",
        1024,
        4096,
    )
    assert parsed.force and parsed.no_wgsl_repair and parsed.link_opt == "O3" and parsed.device == "cpu"


def test_a_hub_snapshot_is_mounted_file_by_file_as_regular_files(tmp_path, image_present):
    """A snapshot folder of the Hub cache links into blobs/, which the converter would refuse (a link
    out of the model folder); each file is mounted on its own, the link resolved."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for name, content in (("config.json", "{}"), ("model.safetensors", "w")):
        (blobs / f"sha-{name}").write_text(content)
        (snapshot / name).symlink_to(f"../../blobs/sha-{name}")
    files = {name: snapshot / name for name in ("config.json", "model.safetensors")}
    job = ConvertJob(
        image="img", model_dir=snapshot, output=tmp_path / "o", quantization="q", gpu=False, model_files=files
    )
    assert run_module.model_mounts(job) == [
        (blobs / "sha-config.json", "/input/model/config.json", True),
        (blobs / "sha-model.safetensors", "/input/model/model.safetensors", True),
    ]
    cmd, _ = docker_command(job)
    assert sum(arg.startswith("type=bind,source=" + str(blobs)) for arg in cmd) == 2
    with pytest.raises(UsageError, match="not a plain file name"):
        run_module.model_mounts(ConvertJob(**{**job.__dict__, "model_files": {"../x": snapshot / "config.json"}}))
