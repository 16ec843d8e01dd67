"""The shape of an adapter_config.json, checked before anything reads it for work (standard library only).

An adapter comes from a stranger: its config is JSON with whatever types its author wrote. PEFT's
config classes are dataclasses that never check their fields' types, so a `"r": "16"`, a
`target_modules` of 5 or a regular expression that does not compile fails deep in peft's merge, or
in the streaming merge's plan, with a traceback and part of the work done. Each field that the
merges read (peft/tuners/lora/config.py and tuners_utils.py, restated) is checked here for the type
PEFT declares, and a wrong one is named with the fix, before the conversion writes anything.

Its regular expressions are matched against every module name, by peft and by the streaming merge:
one written to backtrack catastrophically (`(.*)*z`) would hold a conversion, and the CI job running
it, for hours. `slow_pattern_problem` matches each one against the checkpoint's own module names the
ways PEFT does, under a time limit, and refuses the adapter when a pattern does not finish.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from collections.abc import Iterable

ALL_LINEAR = "all-linear"  # PEFT's target_modules for every Linear but the output head
# LoRA-family ranks and scales; other PEFT types use other names (IA3 has neither)
RANK_KEYS = ("r",)
SCALE_KEYS = ("lora_alpha", "alpha")
FLAG_KEYS = ("use_rslora", "fan_in_fan_out", "use_dora", "inference_mode")
# PEFT's OFT counts blocks by r, where 0 means "set by oft_block_size"
RANK_MAY_BE_ZERO = {"OFT"}
# a valid pattern matches a model's few thousand module names in milliseconds
PATTERN_SECONDS = 2.0


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        return str(error)
    return None


def names_or_regex(key: str, value) -> str | None:
    """target_modules / exclude_modules: a list of module names, or one regular expression."""
    if isinstance(value, str):
        problem = regex_problem(value)
        return f"{key} is a regular expression that does not compile ({problem})" if problem else None
    if not is_str_list(value):
        return f"{key} is {describe(value)}: PEFT takes a list of module names or one regular expression"
    return None


def patterns(key: str, value, valid, what: str) -> str | None:
    """rank_pattern / alpha_pattern: {regular expression: value}."""
    if not isinstance(value, dict):
        return f"{key} is {describe(value)}: PEFT takes an object of module-name patterns to {what}"
    for pattern, item in value.items():
        problem = regex_problem(pattern)
        if problem:
            return f"{key} has the pattern {pattern!r}, which does not compile ({problem})"
        if not valid(item):
            return f"{key}[{pattern!r}] is {describe(item)}, not {what}"
    return None


def describe(value) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def adapter_config_problem(config: dict) -> str | None:
    """The first field of `config` whose type or value no PEFT merge can use, in a phrase; or None."""
    zero_ok = str(config.get("peft_type", "")).upper() in RANK_MAY_BE_ZERO
    for key in RANK_KEYS:
        if key in config and not (is_positive_int(config[key]) or (zero_ok and config[key] == 0)):
            return f"{key} is {describe(config[key])}: a rank is a whole number above 0"
    for key in SCALE_KEYS:
        if key in config and not is_number(config[key]):
            return f"{key} is {describe(config[key])}: a scale is a finite number"
    for key in FLAG_KEYS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            return f"{key} is {describe(config[key])}: it is true or false"
    for key in ("target_modules", "exclude_modules"):
        if config.get(key) is not None:
            problem = names_or_regex(key, config[key])
            if problem:
                return problem
    saved = config.get("modules_to_save")
    if saved is not None and not is_str_list(saved):
        return f"modules_to_save is {describe(saved)}: PEFT takes a list of module names"
    layers = config.get("layers_to_transform")
    if layers is not None and not (is_index(layers) or (isinstance(layers, list) and all(map(is_index, layers)))):
        return f"layers_to_transform is {describe(layers)}: PEFT takes a layer index or a list of them"
    layers_pattern = config.get("layers_pattern")
    if layers_pattern is not None:
        listed = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if not is_str_list(listed):
            return f"layers_pattern is {describe(layers_pattern)}: PEFT takes a name or a list of names"
        for pattern in listed:
            problem = regex_problem(pattern)
            if problem:
                return f"layers_pattern {pattern!r} does not compile as a regular expression ({problem})"
    pattern_values = (("rank_pattern", is_positive_int, "ranks above 0"), ("alpha_pattern", is_number, "numbers"))
    for key, valid, what in pattern_values:
        if config.get(key) is not None:
            problem = patterns(key, config[key], valid, what)
            if problem:
                return problem
    declared = config.get("base_model_name_or_path")
    if declared is not None and not isinstance(declared, str):
        return f"base_model_name_or_path is {describe(declared)}: it names a model"
    return None


def name_end(pattern: str) -> str:
    """PEFT's get_pattern_key: `pattern` matches the whole module name or its end after a dot."""
    return rf"(.*\.)?({pattern})$"


def layer_segment(layers_pattern: str) -> str:
    """The numbered segment after `layers_pattern` in a module name (its group `idx`)."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def config_patterns(config: dict) -> list[tuple[str, str]]:
    """(field, regular expression) for each pattern PEFT matches module names with; the config is
    one adapter_config_problem passed."""
    found = []
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            found.append((key, config[key]))
    for key in ("rank_pattern", "alpha_pattern"):
        found += [(key, pattern) for pattern in config.get(key) or {}]
    layers_pattern = config.get("layers_pattern")
    listed = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    found += [("layers_pattern", pattern) for pattern in listed]
    return found


def module_names(tensor_names: Iterable[str]) -> list[str]:
    """What `model.named_modules()` yields for a checkpoint with these tensors: each dotted prefix."""
    names = set()
    for tensor in tensor_names:
        parts = tensor.split(".")
        names.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return sorted(names)


class PatternTooSlow(Exception):
    pass


def slow_pattern_problem(config: dict, tensor_names: Iterable[str], seconds: float = PATTERN_SECONDS) -> str | None:
    """The first pattern of `config` that does not match every module name within `seconds`, the
    ways PEFT and llm2wasm match it (whole name, search, name end after a dot, a layer's index)."""
    names = module_names(tensor_names)
    for key, pattern in config_patterns(config):
        forms = (pattern, name_end(pattern), layer_segment(pattern))
        try:
            with time_limit(seconds):
                for name in names:
                    re.fullmatch(forms[0], name)
                    re.search(forms[0], name)
                    re.match(forms[1], name)
                    re.match(forms[2], name)
        except PatternTooSlow:
            return (
                f"{key} {describe(pattern)} takes over {seconds:g} s to match this model's module names "
                "(a pattern that backtracks without end)"
            )
        except re.error:
            continue  # the form around it does not compile; PEFT's own use of the pattern was checked
    return None


class time_limit:
    """Raise PatternTooSlow in this thread after `seconds` (SIGALRM: the regular-expression engine
    checks for signals as it backtracks). Only the main thread can take the alarm; `llm2wasm
    convert` checks its inputs there, and elsewhere the patterns run unlimited."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self.expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def expire(self, *_):
        raise PatternTooSlow

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False
