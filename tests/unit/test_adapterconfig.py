"""A stranger's adapter_config.json: every field a merge reads is checked for the type PEFT declares,
and every regular expression is timed against the checkpoint's module names, before any work
(llm2wasm.image.convert.adapterconfig, and `build_request`'s UsageError: exit 2, nothing written)."""

from __future__ import annotations

import threading
import time

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.adapterconfig import (
    adapter_config_problem,
    config_patterns,
    module_names,
    slow_pattern_problem,
)
from tests.unit.test_convert_inputs import make_adapter, make_model, request

LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
TENSORS = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(32) for m in "qkvo"]
# each backtracks without end on a name that does not end in "z"
CATASTROPHIC = ["(.*)*z", "(.|.)*z", "(.*.*)*z"]


@pytest.mark.parametrize(
    "fields,problem",
    [
        ({"r": "16"}, "r is str '16': a rank is a whole number above 0"),
        ({"r": 0}, "r is int 0"),
        ({"r": -4, "use_rslora": True}, "r is int -4"),
        ({"r": True}, "r is bool True"),
        ({"lora_alpha": "32"}, "lora_alpha is str '32': a scale is a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha is float inf"),
        ({"use_rslora": "yes"}, "use_rslora is str 'yes': it is true or false"),
        ({"target_modules": 5}, "target_modules is int 5: PEFT takes a list of module names or one regular"),
        ({"target_modules": ["q_proj", 1]}, "target_modules is list ['q_proj', 1]"),
        ({"target_modules": {"q_proj": 1}}, "target_modules is dict"),
        ({"target_modules": "(q_proj"}, "target_modules is a regular expression that does not compile"),
        ({"exclude_modules": "[a-"}, "exclude_modules is a regular expression that does not compile"),
        ({"modules_to_save": "lm_head"}, "modules_to_save is str 'lm_head': PEFT takes a list of module names"),
        ({"layers_to_transform": "0-3"}, "layers_to_transform is str '0-3'"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform is list [0, -1]"),
        ({"layers_pattern": ["layers", 3]}, "layers_pattern is list ['layers', 3]"),
        ({"layers_pattern": "lay(ers"}, "layers_pattern 'lay(ers' does not compile"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern is list ['q_proj']: PEFT takes an object"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern has the pattern '(', which does not compile"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] is float 2.5, not ranks above 0"),
        ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern['q_proj'] is str '8', not numbers"),
        ({"base_model_name_or_path": ["a"]}, "base_model_name_or_path is list ['a']: it names a model"),
    ],
)
def test_each_field_a_merge_reads_has_the_type_peft_declares(fields, problem):
    found = adapter_config_problem({**LORA, **fields})
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"target_modules": r".*\.(q_proj|v_proj)", "exclude_modules": ["layers.0.self_attn.q_proj"]},
        {"target_modules": "all-linear", "modules_to_save": ["lm_head"], "layers_to_transform": [0, 1]},
        {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {r"layers\.0\..*": 4.5}, "use_rslora": True},
        {"layers_to_transform": 3, "layers_pattern": "layers"},
        {"peft_type": "OFT", "r": 0},  # OFT counts blocks by oft_block_size where r is 0
        {"peft_type": "IA3", "feedforward_modules": ["down_proj"]},  # no rank, no scale
        {"base_model_name_or_path": None, "use_dora": None, "inference_mode": True},
    ],
)
def test_configs_peft_writes_pass(fields):
    config = {**LORA, **fields}
    if config["peft_type"] == "IA3":
        del config["r"], config["lora_alpha"]
    assert adapter_config_problem(config) is None
    assert slow_pattern_problem(config, TENSORS) is None


def test_module_names_are_every_prefix_as_named_modules_yields_them():
    assert module_names(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]) == [
        "lm_head",
        "model",
        "model.layers",
        "model.layers.0",
        "model.layers.0.mlp",
        "model.layers.0.mlp.up_proj",
    ]


def test_every_pattern_field_is_timed():
    config = {
        **LORA,
        "target_modules": "t",
        "exclude_modules": "e",
        "rank_pattern": {"r": 1},
        "alpha_pattern": {"a": 1},
        "layers_pattern": ["l1", "l2"],
    }
    assert config_patterns(config) == [
        ("target_modules", "t"),
        ("exclude_modules", "e"),
        ("rank_pattern", "r"),
        ("alpha_pattern", "a"),
        ("layers_pattern", "l1"),
        ("layers_pattern", "l2"),
    ]
    assert config_patterns(LORA) == []  # a list of names is matched as names, never as patterns


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize(
    "field", ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"]
)
def test_a_pattern_that_backtracks_without_end_is_refused_in_time(field, pattern):
    value = {pattern: 4} if field.endswith("_pattern") and field != "layers_pattern" else pattern
    started = time.monotonic()
    problem = slow_pattern_problem({**LORA, field: value}, TENSORS, seconds=0.3)
    assert time.monotonic() - started < 5
    assert problem is not None and problem.startswith(f"{field} str '{pattern}' takes over 0.3 s")


def test_the_alarm_is_put_back_as_it_was():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    slow_pattern_problem({**LORA, "target_modules": CATASTROPHIC[0]}, TENSORS, seconds=0.2)
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_outside_the_main_thread_the_check_still_runs_without_an_alarm():
    found = []
    config = {**LORA, "target_modules": "q"}
    worker = threading.Thread(target=lambda: found.append(slow_pattern_problem(config, TENSORS)))
    worker.start()
    worker.join(10)
    assert found == [None]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"r": "16"}, "adapter_config.json: r is str '16': a rank is a whole number above 0. It is not a config PEFT"),
        ({"target_modules": "(q_proj"}, "target_modules is a regular expression that does not compile"),
        ({"target_modules": ["q_proj", 1]}, "target_modules is list"),
        ({"target_modules": "(.*)*z"}, "takes over 2 s to match this model's module names"),
    ],
)
def test_a_bad_adapter_config_is_a_usage_error_before_any_work(tmp_path, fields, message):
    model = make_model(tmp_path / "model")
    adapter = make_adapter(tmp_path / "lora", **fields)
    with pytest.raises(UsageError) as error:
        request(model, tmp_path / "out", adapter=str(adapter))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_list_of_target_names_is_never_read_as_a_pattern(tmp_path):
    # PEFT compares a list's entries with module names; one that is a catastrophic pattern is a
    # name that matches nothing, so the adapter is refused for targeting nothing, and at once
    model = make_model(tmp_path / "model")
    adapter = make_adapter(tmp_path / "lora", target_modules=["(.*)*z"])
    started = time.monotonic()
    with pytest.raises(UsageError, match="none of which exist"):
        request(model, tmp_path / "out", adapter=str(adapter))
    assert time.monotonic() - started < 2


def test_all_linear_is_accepted_as_peft_expands_it(tmp_path):
    model = make_model(tmp_path / "model")
    adapter = make_adapter(tmp_path / "lora", target_modules="all-linear")
    assert request(model, tmp_path / "out", adapter=str(adapter)).adapter == adapter.resolve()
