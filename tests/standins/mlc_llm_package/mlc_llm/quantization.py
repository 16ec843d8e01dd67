"""STAND-IN: the names of mlc_llm.quantization.QUANTIZATION at v0.20.0 (18 entries).

Upstream maps each name to a quantization object; here the value only records the storage
dtype the stand-in needs for size figures.
"""

QUANTIZATION = {
    "q0bf16": "bfloat16",
    "q0f16": "float16",
    "q0f32": "float32",
    "q3f16_0": "float16",
    "q3f16_1": "float16",
    "q4f16_0": "float16",
    "q4f16_1": "float16",
    "q4bf16_0": "bfloat16",
    "q4bf16_1": "bfloat16",
    "q4f32_1": "float32",
    "q4f16_2": "float16",
    "q4f16_autoawq": "float16",
    "q4f16_ft": "float16",
    "e5m2_e5m2_f16": "float16",
    "e4m3_e4m3_f16": "float16",
    "e4m3_e4m3_f16_max_calibrate": "float16",
    "fp8_e4m3fn_bf16_block_scale": "bfloat16",
    "fp16_max_calibrate": "float16",
}
