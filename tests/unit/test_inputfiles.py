"""What a conversion reads of a model or adapter folder: an allowlist of regular files inside it.
Every folder here is built the way a hostile upload would be."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import zipfile

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.inputfiles import check_pickle, select_adapter_files, select_model_files

RWKV_INJECTION = "0 \"\\\\\"+str(open(__import__('glob').glob('/output/*')[0]+'/PWNED','w'))#\" 2\n"


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_only_the_files_a_conversion_needs_are_in_the_view(model, tmp_path):
    (model / "rwkv_vocab_v20230424.txt").write_text(RWKV_INJECTION)  # mlc_llm's gen_config eval()s each line
    (model / "modeling_evil.py").write_text("import os")
    (model / "README.md").write_text("hi")
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    (model / "model.safetensors.index.json").write_text("{}")
    (model / "sub").mkdir()
    files = select_model_files(model)
    assert set(files.files) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
    }
    assert files.left_out == ["README.md", "modeling_evil.py", "rwkv_vocab_v20230424.txt", "sub/"]
    assert "rwkv_vocab_v20230424.txt" in files.note()
    view = files.view(tmp_path / "view")
    assert sorted(p.name for p in view.iterdir()) == sorted(files.files)
    assert all((view / name).resolve() == path for name, path in files.files.items())


def test_a_symlink_out_of_the_folder_is_refused(model):
    (model / "merges.txt").symlink_to("/proc/self/environ")  # gen_config copied it into the bundle
    with pytest.raises(UsageError, match=r"merges\.txt is a symlink to '/proc/self/environ', outside the model folder"):
        select_model_files(model)


def test_a_symlink_out_of_the_folder_is_refused_even_when_not_read(model):
    """Left-out files are not opened at all, so a link among them is harmless: only listed ones are checked."""
    (model / "notes.txt").symlink_to("/etc/hostname")
    assert "notes.txt" in select_model_files(model).left_out


def test_a_relative_symlink_climbing_out_is_refused(model, tmp_path):
    (tmp_path / "secret.json").write_text("{}")
    (model / "generation_config.json").symlink_to("../secret.json")
    with pytest.raises(UsageError, match="outside the model folder"):
        select_model_files(model)


def test_a_symlink_inside_the_folder_is_followed(model):
    (model / "blobs").mkdir()
    (model / "blobs" / "abc").write_text("{}")
    (model / "tokenizer_config.json").symlink_to("blobs/abc")
    assert select_model_files(model).files["tokenizer_config.json"] == (model / "blobs" / "abc").resolve()


def test_a_dangling_symlink_is_refused(model):
    (model / "vocab.json").symlink_to("gone.json")
    with pytest.raises(UsageError, match="which does not exist here"):
        select_model_files(model)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_listed_name_that_is_no_regular_file_is_refused(model, kind):
    path = model / "special_tokens_map.json"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(UsageError, match="must be a regular file"):
        select_model_files(model)


def test_a_sparse_multi_gigabyte_config_is_refused_without_reading_it(model):
    with open(model / "config.json", "r+b") as handle:
        handle.truncate(3 * 2**30)
    with pytest.raises(UsageError, match=r"config\.json is 3,072 MiB, more than any config\.json needs"):
        select_model_files(model)


def test_adapter_folder_allowlist(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "training_args.bin").write_bytes(b"not read")
    (adapter / "tokenizer.json").symlink_to("/proc/self/environ")
    with pytest.raises(UsageError, match="outside the adapter folder"):
        select_adapter_files(adapter)
    (adapter / "tokenizer.json").unlink()
    files = select_adapter_files(adapter)
    assert set(files.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert files.left_out == ["training_args.bin"]


# -- pickle checkpoints --------------------------------------------------------------------------------


def torch_like_modules(monkeypatch):
    """Stand-ins for torch's module names so pickle writes the GLOBALs a real state dict has."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        return args

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return _rebuild_tensor_v2


class Tensor:
    def __init__(self, rebuild):
        self.rebuild = rebuild

    def __reduce__(self):
        return (self.rebuild, (1, 2))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/PWNED",))


def checkpoint(path, obj, protocol=2):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=protocol))
    return path


def test_a_pickle_of_tensors_passes(tmp_path, monkeypatch):
    rebuild = torch_like_modules(monkeypatch)
    from collections import OrderedDict

    check_pickle(checkpoint(tmp_path / "pytorch_model.bin", OrderedDict(w=Tensor(rebuild))), tmp_path / "x")


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_runs_code_is_refused(tmp_path, protocol):
    path = checkpoint(tmp_path / "pytorch_model.bin", {"w": Payload()}, protocol)
    with pytest.raises(UsageError, match="loading it would run that code"):
        check_pickle(path, path)


def test_stack_global_names_taken_from_the_memo_are_tracked(tmp_path, monkeypatch):
    """STACK_GLOBAL reads its names from the stack; a memoised 'os' 'system' must not pass for the
    allowed names pushed just before."""
    import pickletools  # noqa: F401 (documents what the bytes below are)

    data = (
        b"\x80\x04"
        b"\x8c\x02os\x94\x8c\x06system\x94"  # memo 0 = 'os', memo 1 = 'system'
        b"\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2"  # the allowed names, pushed and left
        b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL -> os.system
        b"\x8c\x03id\x85R."
    )
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
    with pytest.raises(UsageError, match="'os system'"):
        check_pickle(path, path)


def test_a_legacy_or_damaged_pickle_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"a": 1}))  # not a zip checkpoint
    with pytest.raises(UsageError, match="not a PyTorch zip checkpoint"):
        check_pickle(path, path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"a": 1})[:-3])
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UsageError, match="damaged pickle"):
        check_pickle(path, path)


def test_a_pickle_checkpoint_in_a_model_folder_is_checked(model):
    checkpoint(model / "pytorch_model.bin", {"w": Payload()})
    with pytest.raises(UsageError, match=r"pytorch_model\.bin is a pickle that names 'posix system'"):
        select_model_files(model)


def test_the_step_cache_key_follows_content_not_mtimes(model, tmp_path):
    """`rsync -a` / `tar` keep sizes and modification times: other weights of the same size copied
    so must still be other inputs."""
    from llm2wasm.image.convert.inputs import fingerprint

    before = fingerprint(select_model_files(model))
    stat = (model / "model.safetensors").stat()
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(data))
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (model / "model.safetensors").stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(select_model_files(model)) != before
    (model / "README.md").write_text("left out, so no input")
    data[-1] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint(select_model_files(model)) == before


def test_the_input_checks_open_only_the_selected_files(model):
    """A name the allowlist leaves out is never opened, not even by the checks (a FIFO there would
    hang them): here a damaged `x y.safetensors` beside the real weights."""
    from llm2wasm.image.convert.inputs import check_model_dir, weight_files

    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (model / "x y.safetensors").write_bytes(b"garbage")
    files = select_model_files(model)
    assert "x y.safetensors" in files.left_out
    assert weight_files(files) == [(model / "model.safetensors").resolve()]
    assert check_model_dir(model, files) == {"model_type": "llama"}
