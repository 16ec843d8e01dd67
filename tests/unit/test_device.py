import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.device import choose_device, is_out_of_memory


def test_auto_takes_the_gpu_when_there_is_one():
    assert choose_device("auto", lambda: True)[0] == "cuda"


def test_auto_falls_back_to_the_cpu_and_says_why():
    device, why = choose_device("auto", lambda: False)
    assert device == "cpu" and "no CUDA device" in why


def test_cpu_never_asks_for_a_gpu():
    def must_not_be_called():
        raise AssertionError("probed for CUDA although --device cpu")

    assert choose_device("cpu", must_not_be_called)[0] == "cpu"


def test_cuda_without_a_gpu_is_bad_input_naming_the_fix():
    with pytest.raises(UsageError) as error:
        choose_device("cuda", lambda: False)
    assert "--gpus all" in str(error.value) and "--device cpu" in str(error.value) and error.value.exit_code == 2


def test_unknown_device():
    with pytest.raises(UsageError, match="unknown --device 'tpu'"):
        choose_device("tpu", lambda: False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("RuntimeError: CUDA error: out of memory", True),
        ("ValueError: Unknown model type: foo", False),
    ],
)
def test_out_of_memory_is_recognised(text, expected):
    assert is_out_of_memory(text) is expected
