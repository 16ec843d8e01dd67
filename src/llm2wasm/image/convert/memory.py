"""Whether this machine (or the container's memory limit) can hold what a conversion needs: checked
before any step runs, so that a conversion that cannot fit is refused with the figures (exit 2,
nothing written) instead of being killed half-way (exit 137).

Available: the smallest of the cgroup v2 limit (memory.max; "max" is none), the cgroup v1 limit
(memory.limit_in_bytes; v1 writes "none" as a number near 2**63) and the kernel's MemAvailable.

Needed: an estimate, from the weights' safetensors headers alone (dtypes and shapes; the tensors
are never read), of the anonymous memory at the conversion's peak: what cannot be dropped under
pressure. Weights read through mmap are file-backed (page cache the kernel reclaims) and are not
counted. The model, and what each part of it rests on:

* merge (only with --adapter), in the converter's own process, one of:
  - the streaming merge (llm2wasm.image.convert.streammerge / merge.stream_merge): one changed tensor
    at a time, W in float32, its delta B·A in float32 and the result in W's dtype, so the largest
    changed tensor times (4 + 4 + its itemsize) bytes, plus the adapter's tensors;
  - peft's merge (--peft-merge, or the fall-back for what the streaming merge does not cover;
    merge.peft_merge): transformers maps the checkpoint (file-backed) where a tensor's dtype is the
    merge dtype (bf16 for a bf16 checkpoint, else f16) and converts the rest (anonymous); merging
    writes every targeted weight (copy on write: anonymous), in the merge dtype; the delta is made in
    float32 on the CPU; the adapter is loaded in float32. On a GPU the merged model comes back to
    the host whole (merged.to("cpu")): every tensor in the merge dtype. Measured (issue 28) on a
    Llama-3.1-8B shape, rank-16 adapter, CPU: all linear layers 14.1 GB anonymous, this model
    15.0 GB; q/k/v/o only 3.1 GB, this model 3.5 GB; on a GPU 16 GB of host memory, this model 18.1 GB.
* then mlc_llm convert_weight and compile side by side (converter.py). convert_weight
  (mlc-llm 79d603f0, python/mlc_llm/interface/convert_weight.py and loader/huggingface_loader.py):
  HuggingFaceLoader opens one safetensors file at a time (safe_open: mmap, file-backed), and per
  MLC parameter concatenates its source tensors (q/k/v into qkv_proj, gate/up into gate_up_proj,
  the experts of a MoE layer into one) with numpy, casts them to the model dtype (`astype`: a copy),
  makes a TVM tensor of it (another copy), quantizes it, copies the result to the CPU and dumps it
  (tvmjs.dump_tensor_cache: `.numpy()` and `.tobytes()`, two more copies; shards of 32 MB). So the
  peak is the largest MLC parameter times a few copies in the model dtype (f16 for q*f16_*, f32
  for q*f32_*): COPIES below, read off that code, not measured. The largest MLC parameter is bounded
  here by the sum of the tensors of one module (e.g. a layer's self_attn: q, k, v and o), numbered
  sub-modules after the layer's number counted together (a MoE layer's experts). Pickle checkpoints
  (pytorch_model*.bin) are read whole by torch.load, bf16 widened to float32: three times the
  largest file stands in for the headers there.
  compile's own peak does not depend on the weights: COMPILE_BASE, an estimate.
* each process's own memory (Python, torch, TVM imported): the *_BASE constants, estimates.

Measured with bench/scale.py (bench/results.md), anonymous memory to q4f16_1: the Llama-3.2-1B shape
2.72 GB (this model 3.5 GB before the margin), 3.2-3B 4.18 GB (4.7), 3.1-8B 5.70 GB (5.9), and 5.79 GB
with an all-linear adapter (6.4), in a container held to 8 GiB as well; MEASURED_EXTRA_BYTES comes
from those rows. The result is multiplied by MARGIN for what the model leaves out
(allocator fragmentation, smaller buffers, page cache the kernel cannot drop fast enough).
--skip-memory-check runs the conversion whatever the estimate says.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.inputs import ConvertRequest, safetensors_header, weight_files

GB = 10**9
MARGIN = 1.2
# Each process's own resident memory, estimated (not measured per process):
CONVERTER_BASE = int(0.15 * GB)  # the converter: Python and its standard library
TORCH_BASE = int(0.5 * GB)  # a process that imported torch (+ safetensors, transformers, peft): the merge
CONVERT_WEIGHT_BASE = int(0.5 * GB)  # mlc_llm convert_weight: torch, numpy, TVM's runtime, mlc_llm
COMPILE_BASE = int(0.5 * GB)  # mlc_llm compile (TVM's lowering, emcc's link): not the weights
CUDA_BASE = int(1.0 * GB)  # host memory of a CUDA context, in each process that makes one
# Copies of the largest MLC parameter, in the model dtype, alive at convert_weight's peak (see above).
# Group-quantized, read off the code: astype + TVM tensor (the quantized outputs and their copies
# are ~0.3 of it each in f16). q0f16: TVM tensor, copyto(cpu), .numpy(), .tobytes(). q0f32: TVM
# tensor, copyto(cpu) and .numpy(), and beside them the f32-to-bf16 encoding's temporaries
# (dump_tensor_cache's encode_format "f32-to-bf16": comparison masks, uint32 shifts, zeros_like,
# np.where), about 3.3 more at once.
COPIES_QUANTIZED = 2.25
COPIES = {"q0f16": 4.0, "q0f32": 6.5}
# What measurement added for the group quantizations (bench/scale.py, bench/results.md 2026-12-05):
# the Llama-3.2-1B, 3.2-3B and 3.1-8B shapes (largest parameter the 128256-row embedding: 263M, 394M
# and 525M elements) peaked at 2.72, 4.18 and 5.70 GB anonymous to q4f16_1 and at 2.99 and 5.02 GB
# (1B, 3B) to q4f32_1, about 11 and 15 bytes per element of that parameter from one shape to the
# next, where the copies above say 4.5 and 9: the source tensor read out of its mapping into memory
# and its float32 widening, which the reading of the code missed. Counted as the source's size and
# 2.5 bytes more per element, it covers every row measured before the margin (3.5, 4.7, 5.9 GB raw
# to q4f16_1), and with the margin an 8B conversion with an adapter is still allowed in the 8 GiB it
# was measured to finish in (bench/results.md).
MEASURED_EXTRA_BYTES = 2.5

# safetensors dtypes and their sizes in bits (safetensors' Dtype enum)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
FLOATS = {"F16", "BF16", "F32", "F64"}
MAX_DIMS = 8
MAX_ELEMENTS = 2**48  # far beyond any checkpoint: a shape past it is a hostile header

CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
V1_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (~2**63)


# -- what is available -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Available:
    bytes: int | None  # None: nothing could be read
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace")[:64].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_limit(cgroup: Path = CGROUP) -> tuple[int, str] | None:
    """The cgroup's memory limit: v2 (memory.max), else v1 (memory/memory.limit_in_bytes); None for none."""
    v2 = cgroup / "memory.max"
    if v2.is_file():
        value = _read_int(v2)  # "max": no limit
        return (value, "the container's memory limit, cgroup v2 memory.max") if value is not None else None
    for v1 in (cgroup / "memory" / "memory.limit_in_bytes", cgroup / "memory.limit_in_bytes"):
        if v1.is_file():
            value = _read_int(v1)
            if value is not None and value < V1_UNLIMITED:
                return value, "the container's memory limit, cgroup v1 memory.limit_in_bytes"
            return None
    return None


def mem_available(meminfo: Path = MEMINFO) -> int | None:
    """The kernel's MemAvailable (what can be had without swapping), in bytes."""
    try:
        lines = meminfo.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        match = re.fullmatch(r"MemAvailable:\s*(\d+)\s*kB", line.strip())
        if match:
            return int(match.group(1)) * 1024
    return None


def available_memory(cgroup: Path = CGROUP, meminfo: Path = MEMINFO) -> Available:
    """The smaller of the cgroup's limit and the machine's MemAvailable."""
    candidates = []
    limit = cgroup_limit(cgroup)
    if limit is not None:
        candidates.append(limit)
    free = mem_available(meminfo)
    if free is not None:
        candidates.append((free, "this machine's available memory (MemAvailable)"))
    if not candidates:
        return Available(None, "neither a cgroup limit nor /proc/meminfo could be read")
    value, source = min(candidates)
    return Available(value, source)


# -- the weights, from their headers ---------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    elements: int

    @property
    def nbytes(self) -> int:
        return math.ceil(self.elements * DTYPE_BITS[self.dtype] / 8)


def read_tensors(path: Path) -> list[Tensor]:
    """The tensors a safetensors file declares, validated: its header only (bounded and parsed as JSON
    by inputs.safetensors_header), each entry a known dtype, a shape of at most MAX_DIMS non-negative
    integers, and a byte range inside the file that is exactly that shape in that dtype."""
    header = safetensors_header(path)
    damaged = f"{path} is not a complete safetensors file"
    prefix = 8 + _header_length(path)
    data_size = path.stat().st_size - prefix
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise UsageError(f"{damaged} (its entry {name[:80]!r} is not an object): download it again")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise UsageError(
                f"{damaged} ({name[:80]!r} has dtype {str(dtype)[:40]!r}, which safetensors does not know)"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(dim) is int and 0 <= dim <= MAX_ELEMENTS for dim in shape)
        ):
            raise UsageError(
                f"{damaged} ({name[:80]!r} has shape {str(shape)[:80]}: not a list of at most "
                f"{MAX_DIMS} non-negative sizes): download it again"
            )
        elements = math.prod(shape)
        if elements > MAX_ELEMENTS:
            raise UsageError(f"{damaged} ({name[:80]!r} declares {elements:.3g} elements): download it again")
        tensor = Tensor(name, dtype, elements)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(value) is int for value in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
            or offsets[1] - offsets[0] != tensor.nbytes
        ):
            raise UsageError(
                f"{damaged} ({name[:80]!r}: data_offsets {str(offsets)[:80]} do not hold {tensor.nbytes:,} bytes "
                f"within its {max(data_size, 0):,} bytes of data): download it again"
            )
        tensors.append(tensor)
    return tensors


def _header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def group_of(name: str) -> str:
    """The module a tensor belongs to, for bounding mlc_llm's fused parameters: the name without its
    last two parts (leaf module, parameter), numbers after the first (the layer's) made `*`."""
    parts = name.split(".")[:-2] or [name]
    seen_number = False
    for index, part in enumerate(parts):
        if part.isdigit():
            if seen_number:
                parts[index] = "*"
            seen_number = True
    return ".".join(parts)


def largest_parameter(tensors: list[Tensor]) -> tuple[int, int, str]:
    """(elements, widest source itemsize, name) of the largest MLC parameter, bounded from above by
    the tensors of one module together."""
    groups: dict[str, list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(group_of(tensor.name), []).append(tensor)
    candidates = [(0, 2, "none")]
    for module, members in groups.items():
        elements = sum(t.elements for t in members)
        widest = max(max(1, DTYPE_BITS[t.dtype] // 8) for t in members)
        biggest = max(members, key=lambda t: t.elements)
        name = biggest.name if elements <= biggest.elements * 1.01 else f"{module}.* ({len(members)} tensors)"
        candidates.append((elements, widest, name))
    return max(candidates)


# -- the estimate ----------------------------------------------------------------------------------
@dataclass
class Estimate:
    merge: int | None  # the merge's peak (None without an adapter)
    merge_kind: str | None
    convert: int  # convert_weight and compile side by side
    largest: str
    notes: list[str] = field(default_factory=list)

    @property
    def raw(self) -> int:
        return max(self.merge or 0, self.convert)

    @property
    def needed(self) -> int:
        return int(self.raw * MARGIN)

    def summary(self) -> str:
        merge = f"{self.merge_kind} {gb(self.merge)}; " if self.merge is not None else ""
        return (
            f"about {gb(self.needed)} at the peak ({merge}convert_weight + compile {gb(self.convert)}, "
            f"its largest parameter {self.largest}; x{MARGIN} margin)"
        )


def gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GB:.1f} GB"


def model_dtype_bytes(quantization: str) -> int:
    """The dtype mlc_llm computes the weights in before quantizing: f16 for q4f16_1, f32 for q4f32_1."""
    match = re.fullmatch(r"q\d+(?:bf|f)(\d+)(?:_\w+)?", quantization)
    return max(1, int(match.group(1)) // 8) if match else 4


def convert_weight_peak(files: list[Path], quantization: str) -> tuple[int, str]:
    """convert_weight's working memory on top of its process (see the module's docstring)."""
    dst = model_dtype_bytes(quantization)
    copies = COPIES.get(quantization, COPIES_QUANTIZED)
    pickles = [path for path in files if path.suffix != ".safetensors"]
    if pickles:
        largest = max(pickles, key=lambda path: path.stat().st_size)
        return 3 * largest.stat().st_size, f"{largest.name} read whole (a pickle checkpoint)"
    tensors = [tensor for path in files for tensor in read_tensors(path)]
    elements, src, what = largest_parameter(tensors)
    measured = quantization not in COPIES  # q0f16/q0f32 were not measured at scale: as read off the code
    per_element = copies * dst + src + MEASURED_EXTRA_BYTES if measured else max(copies * dst, src + dst)
    return int(elements * per_element), f"{what}, {elements / 1e6:,.0f}M elements"


def merge_peak(request: ConvertRequest, device: str) -> tuple[int, str]:
    """The merge's working memory on top of the converter (see the module's docstring)."""
    from llm2wasm.image.convert.streammerge import Unsupported, plan_merge

    model, adapter = request.model_view or request.model_dir, request.adapter_view or request.adapter
    reason = "--peft-merge"
    plan = None
    if not request.peft_merge:
        try:
            plan = plan_merge(model, adapter)
        except Unsupported as why:
            reason = f"not streamed: {why}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # the merge says what
            reason = f"its plan failed: {type(error).__name__}"
    cuda = CUDA_BASE if device == "cuda" else 0
    files = weight_files(request.model_files) if request.model_files is not None else []
    adapter_file = adapter / "adapter_model.safetensors"
    adapter_tensors = read_tensors(adapter_file) if adapter_file.is_file() else []
    adapter_f32 = sum(tensor.elements * 4 for tensor in adapter_tensors)
    if not adapter_tensors and (adapter / "adapter_model.bin").is_file():
        adapter_f32 = 2 * (adapter / "adapter_model.bin").stat().st_size
    if plan is not None:
        sizes = {tensor.name: tensor for path in plan.shards.values() for tensor in read_tensors(path)}
        changed = [sizes[name] for name in plan.changes if name in sizes]
        one = max((t.elements * (8 + DTYPE_BITS[t.dtype] // 8) for t in changed), default=0)
        return TORCH_BASE + cuda + one + adapter_f32, "streaming merge"
    if any(path.suffix != ".safetensors" for path in files):  # a pickle is loaded whole
        return TORCH_BASE + cuda + sum(path.stat().st_size for path in files) + adapter_f32, f"peft merge ({reason})"
    config = json.loads((model / "config.json").read_text())
    declared = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    merge_dtype = "BF16" if declared == "bfloat16" else "F16"
    prefixes = set()
    for tensor in adapter_tensors:
        parts = tensor.name.removeprefix("base_model.model.").split(".")
        prefixes.update(".".join(parts[:end]) for end in range(1, len(parts)))
    tensors = [tensor for path in files for tensor in read_tensors(path)]
    targeted = [t for t in tensors if t.name.rsplit(".", 1)[0] in prefixes or t.name in prefixes]
    if device == "cuda":
        copied = sum(t.elements * 2 for t in tensors if t.dtype in FLOATS)  # merged.to("cpu"): all of it
    else:
        target_names = {t.name for t in targeted}
        copied = sum(
            t.elements * 2 for t in tensors if t.dtype in FLOATS and (t.dtype != merge_dtype or t.name in target_names)
        )
    delta = max((t.elements * 4 for t in targeted), default=0)
    return TORCH_BASE + cuda + copied + delta + adapter_f32, f"peft merge ({reason})"


def estimate(request: ConvertRequest, device: str) -> Estimate:
    files = weight_files(request.model_files) if request.model_files is not None else []
    working, largest = convert_weight_peak(files, request.quantization)
    merge = kind = None
    torch_left = 0
    if request.adapter is not None:
        merge_working, kind = merge_peak(request, device)
        merge = CONVERTER_BASE + merge_working
        torch_left = TORCH_BASE + (CUDA_BASE if device == "cuda" else 0)  # the merge ran in this process
    cuda = CUDA_BASE if device == "cuda" else 0
    convert = CONVERTER_BASE + torch_left + CONVERT_WEIGHT_BASE + cuda + working + COMPILE_BASE
    return Estimate(merge, kind, convert, largest)


def alternatives(request: ConvertRequest, device: str, available: int) -> list[str]:
    """What would fit, each with its estimate."""
    from dataclasses import replace

    options = []
    tries = []
    if request.adapter is not None and request.peft_merge:
        tries.append(("drop --peft-merge (the streaming merge)", replace(request, peft_merge=False), device))
    if device == "cuda":
        tries.append(("--device cpu", request, "cpu"))
    for quantization in ("q4f16_1", "q4f32_1"):
        if request.quantization.startswith("q0") and quantization != request.quantization:
            tries.append((f"-q {quantization}", replace(request, quantization=quantization), device))
            break
    for what, changed, on in tries:
        needed = estimate(changed, on).needed
        if needed <= available:
            options.append(f"{what}: about {gb(needed)}")
    return options


def check_memory(request: ConvertRequest, device: str, say, available: Available | None = None) -> Estimate:
    """Say the estimate in one line; refuse (UsageError, exit 2) when it exceeds what is available,
    unless request.skip_memory_check."""
    available = available or available_memory()
    result = estimate(request, device)
    fits = available.bytes is None or result.needed <= available.bytes
    verdict = "not checked (--skip-memory-check)" if request.skip_memory_check else "fits" if fits else "too much"
    say(f"  memory: {result.summary()}; {gb(available.bytes)} available, {available.source}: {verdict}")
    if fits or request.skip_memory_check:
        return result
    fits = alternatives(request, device, available.bytes)
    instead = ("; or " + "; or ".join(fits)) if fits else ""
    raise UsageError(
        f"this conversion needs about {gb(result.needed)} of memory and {gb(available.bytes)} is available "
        f"({available.source}): it would be killed part-way. Breakdown: {result.summary()}. "
        f"What would fit: a machine with more memory (`invoke convert` gives the container this machine's "
        f'memory less 1 GiB){instead}. The figure is an estimate (docs/CONVERT.md, "Memory"): '
        "--skip-memory-check runs the conversion anyway"
    )
