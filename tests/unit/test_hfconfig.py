"""The config dialect mapping and the parity guard, on configs saved by the pinned transformers in
both dialects and on the real mlc_llm config classes of the mlc-llm source the mirror serves."""

from __future__ import annotations

import json

import pytest
from transformers import GPTNeoXConfig, LlamaConfig, PretrainedConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.hfconfig import hf_view, mlc_config, parity_mismatches
from llm2wasm.image.convert.mlcprobe import reads_from_sources
from tests.upstream_sources import class_source, mlc_llm_file

# model_type -> (module in mlc-llm's python/mlc_llm/model/, config class)
MLC_CLASSES = {
    "llama": ("llama/llama_model.py", "LlamaConfig"),
    "qwen2": ("qwen2/qwen2_model.py", "QWen2Config"),
    "gpt_neox": ("gpt_neox/gpt_neox_model.py", "GPTNeoXConfig"),
    "phi3": ("phi3/phi3_model.py", "Phi3Config"),
}
# Llama 3's rope as transformers 5 saves it (in rope_parameters, with its base)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 32}


def real_reads(model_type):
    module, name = MLC_CLASSES[model_type]
    source = mlc_llm_file(f"python/mlc_llm/model/{module}")
    return reads_from_sources([class_source(source, name)], source, set(ROPE_INIT_FUNCTIONS))


def saved(tmp_path, config: PretrainedConfig, name="model", legacy: dict | None = None):
    """A model folder's config.json as transformers 5 saves it, or (legacy) in the 4.x dialect."""
    folder = tmp_path / name
    config.save_pretrained(folder)
    if legacy is not None:
        data = json.loads((folder / "config.json").read_text())
        data.pop("rope_parameters", None)
        data.update(legacy)
        (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_real_config_classes_are_read():
    llama = real_reads("llama")
    assert {"position_embedding_base", "rope_scaling", "head_dim"} <= llama.fields
    assert llama.reads("rope_theta")  # from kwargs in __post_init__, not a field
    assert llama.rope_types == {"llama3"}
    assert "rope_theta" in real_reads("qwen2").fields and not real_reads("qwen2").rope_types
    assert real_reads("phi3").rope_types == {"longrope"}  # "su" is its old name
    assert "rotary_pct" in real_reads("gpt_neox").fields


def test_transformers_5_llama_gets_its_rope_base(tmp_path):
    folder = saved(tmp_path, LlamaConfig(**TINY, rope_theta=50000.0))
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 50000.0  # the dialect
    config, written = mlc_config(raw, hf_view(folder), real_reads("llama"))
    assert config["rope_theta"] == 50000.0 and "rope_scaling" not in config
    assert written == ["rope_theta = 50000.0"]


def test_both_dialects_give_the_same_view(tmp_path):
    new = hf_view(saved(tmp_path, LlamaConfig(**TINY, rope_theta=50000.0), "new"))
    old = hf_view(saved(tmp_path, LlamaConfig(**TINY), "old", legacy={"rope_theta": 50000.0, "rope_scaling": None}))
    assert new.rope_theta == old.rope_theta == 50000.0 and new.rope_type == old.rope_type == "default"
    # a 4.x config already carries what mlc_llm reads: nothing to write
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    assert mlc_config(raw, old, real_reads("llama")) == (raw, [])


def test_llama3_scaling_is_handed_over_with_its_parameters(tmp_path):
    rope = dict(LLAMA3_ROPE)
    folder = saved(tmp_path, LlamaConfig(**TINY, rope_parameters=rope))
    config, _ = mlc_config(json.loads((folder / "config.json").read_text()), hf_view(folder), real_reads("llama"))
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 8.0


def test_qwen2_gets_its_required_rope_theta(tmp_path):
    folder = saved(tmp_path, Qwen2Config(**TINY, num_key_value_heads=2, rope_theta=1e6))
    config, _ = mlc_config(json.loads((folder / "config.json").read_text()), hf_view(folder), real_reads("qwen2"))
    assert config["rope_theta"] == 1e6


def test_gpt_neox_gets_its_rotary_fraction(tmp_path):
    folder = saved(tmp_path, GPTNeoXConfig(**TINY, rotary_pct=0.25))
    raw = json.loads((folder / "config.json").read_text())
    assert "rotary_pct" not in raw  # transformers 5 moved it into rope_parameters
    config, _ = mlc_config(raw, hf_view(folder), real_reads("gpt_neox"))
    assert config["rotary_pct"] == 0.25


def test_a_rope_type_the_installed_model_lacks_is_refused(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 128}
    folder = saved(tmp_path, Qwen2Config(**TINY, num_key_value_heads=2, rope_parameters=rope))
    with pytest.raises(UsageError) as error:
        mlc_config(json.loads((folder / "config.json").read_text()), hf_view(folder), real_reads("qwen2"))
    assert "rope_type = 'yarn'" in str(error.value) and "implements: default" in str(error.value)
    with pytest.raises(UsageError, match=r"'linear'.*implements: default, llama3"):
        rope = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
        folder = saved(tmp_path, LlamaConfig(**TINY, rope_parameters=rope), "linear")
        mlc_config(json.loads((folder / "config.json").read_text()), hf_view(folder), real_reads("llama"))


def mlc_model_config(**values):
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 32,
        "tie_word_embeddings": False,
        "position_embedding_base": 10000,
        "rope_scaling": None,
        "num_key_value_heads": 4,
        "head_dim": 16,
    }
    return {**base, **values}


def test_parity_guard_catches_a_silent_default(tmp_path):
    hf = hf_view(saved(tmp_path, LlamaConfig(**TINY, rope_theta=50000.0)))
    # what mlc_llm's LlamaConfig made of the transformers 5 config without the mapping: 10000
    assert parity_mismatches(mlc_model_config(), hf) == [
        "rope base: transformers 50000.0, mlc_llm position_embedding_base = 10000"
    ]
    assert parity_mismatches(mlc_model_config(position_embedding_base=50000.0), hf) == []


def test_parity_guard_names_every_field(tmp_path):
    hf = hf_view(saved(tmp_path, LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True)))
    found = parity_mismatches(mlc_model_config(num_hidden_layers=3, rms_norm_eps=1e-5), hf)
    assert found == [
        "layers: transformers 2, mlc_llm num_hidden_layers = 3",
        "KV heads: transformers 2, mlc_llm num_key_value_heads = 4",
        "norm epsilon: transformers 1e-06, mlc_llm rms_norm_eps = 1e-05",
        "tied embeddings: transformers true, mlc_llm tie_word_embeddings = false",
    ]


def test_parity_guard_catches_dropped_rope_scaling(tmp_path):
    rope = dict(LLAMA3_ROPE)
    hf = hf_view(saved(tmp_path, LlamaConfig(**TINY, rope_parameters=rope)))
    found = parity_mismatches(mlc_model_config(position_embedding_base=500000.0), hf)
    assert len(found) == 1 and found[0].startswith('rope scaling: transformers {"rope_type": "llama3"')
    assert found[0].endswith("mlc_llm null")
    scaled = mlc_model_config(position_embedding_base=500000.0, rope_scaling={**rope, "factor": 8.0})
    assert parity_mismatches(scaled, hf) == []


def test_parity_guard_sliding_window(tmp_path):
    from transformers import MistralConfig

    hf = hf_view(saved(tmp_path, MistralConfig(**TINY, num_key_value_heads=4, sliding_window=64)))
    assert parity_mismatches(mlc_model_config(sliding_window_size=64), hf) == []
    assert parity_mismatches(mlc_model_config(sliding_window_size=-1), hf) == [
        "sliding window: transformers 64, mlc_llm sliding_window_size = -1"
    ]


def test_a_stale_top_level_rope_theta_yields_to_what_transformers_computes_with(tmp_path):
    """transformers 5's GPTNeoXConfig(rope_theta=...) saves that keyword as a top-level key beside
    rope_parameters (default base), and the model computes with rope_parameters; mlc_llm alone reads
    the stale key. The mapping hands mlc_llm what transformers computes with."""
    folder = saved(tmp_path, GPTNeoXConfig(**TINY, rotary_pct=0.25, rope_theta=20000.0))
    raw = json.loads((folder / "config.json").read_text())
    assert raw["rope_theta"] == 20000.0 and raw["rope_parameters"]["rope_theta"] == 10000.0
    config, written = mlc_config(raw, hf_view(folder), real_reads("gpt_neox"))
    assert config["rope_theta"] == 10000.0 and "rope_theta = 10000.0" in written


def test_an_untied_head_the_installed_loader_would_not_read_is_a_problem():
    from llm2wasm.image.convert.hfconfig import untied_head_problem, view_of

    untied = view_of({"model_type": "starcoder2", "tie_word_embeddings": False})
    tied = view_of({"model_type": "starcoder2", "tie_word_embeddings": True})
    problem = untied_head_problem("starcoder2", untied, reads_lm_head=False)
    assert problem and "starcoder2" in problem and "lm_head.weight" in problem and "tied embeddings" in problem
    assert untied_head_problem("starcoder2", untied, reads_lm_head=True) is None  # a loader that reads it
    assert untied_head_problem("gpt2", tied, reads_lm_head=False) is None  # tied: nothing of its own to drop
    assert untied_head_problem("starcoder2", untied, reads_lm_head=None) is None  # mapping not built: no guess


@pytest.fixture
def broken_mlc_llm(tmp_path, monkeypatch):
    """An mlc_llm that fails on import, first on the probes' path: what a broken image holds."""
    package = tmp_path / "mlc_llm"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('mlc_llm broken for this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_a_failing_head_probe_warns_and_does_not_refuse(broken_mlc_llm, capsys):
    from llm2wasm.image.convert.mlcprobe import probe_reads_output_head

    assert probe_reads_output_head("starcoder2", {"tie_word_embeddings": False}) is None
    warning = capsys.readouterr().err
    assert "could not build mlc_llm's weight mapping" in warning and "mlc_llm broken for this test" in warning


def test_a_failing_config_probe_refuses_with_the_probes_error(broken_mlc_llm):
    from llm2wasm.image.convert.mlcprobe import probe_installed_mlc

    with pytest.raises(UsageError, match=r"(?s)config class for 'llama'.*mlc_llm broken for this test"):
        probe_installed_mlc("llama", set(ROPE_INIT_FUNCTIONS))


def phi35_view(tmp_path):
    """Phi-3.5 mini's rope as transformers 5 saves it (long and short factors, original context 4096)."""
    from transformers import Phi3Config

    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [1.5] * 8,
        "original_max_position_embeddings": 4096,
    }
    config = Phi3Config(
        **TINY, max_position_embeddings=131072, original_max_position_embeddings=4096, rope_parameters=rope
    )
    return hf_view(saved(tmp_path, config))


def test_longrope_beyond_its_original_context_is_warned_about(tmp_path):
    from llm2wasm.image.convert.hfconfig import longrope_beyond_original_context

    phi35 = phi35_view(tmp_path)
    assert phi35.rope_type == "longrope"
    warning = longrope_beyond_original_context(phi35, 131072)
    assert warning and "beyond 4096" in warning and "--context-window 4096" in warning
    assert longrope_beyond_original_context(phi35, 4096) is None
    assert longrope_beyond_original_context(phi35, None) is None


def test_other_rope_types_are_not_warned_about(tmp_path):
    from llm2wasm.image.convert.hfconfig import longrope_beyond_original_context

    llama3 = hf_view(saved(tmp_path, LlamaConfig(**TINY, max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE)))
    assert llama3.rope_type == "llama3"
    assert longrope_beyond_original_context(llama3, 131072) is None
