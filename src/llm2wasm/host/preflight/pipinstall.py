"""What the image's `pip install` is, as preflight reads it from the profile: where it looks for
packages (``pip_options``: PyPI by default, other indexes, find-links pages) and what it can install
(``python_version`` on linux for this host's architecture: the wheel tags it accepts).

Parsed once in llm2wasm.host.preflight and handed to every wheel check (llm2wasm.host.preflight.wheels,
llm2wasm.host.preflight.torchcuda); kept apart from them because it reads the profile, not the network.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from packaging import tags
from packaging.version import Version

PYPI_SIMPLE = "https://pypi.org/simple/"


@dataclass(frozen=True)
class Target:
    """The interpreter and platform the image installs wheels for."""

    python: tuple[int, int]
    arch: str  # wheel spelling: x86_64, aarch64

    @property
    def python_tag(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}"

    @property
    def platforms(self) -> list[str]:
        # Ubuntu 24.04 has glibc 2.39; every manylinux wheel up to that runs there.
        names = [f"manylinux_2_{minor}_{self.arch}" for minor in range(39, 16, -1)]
        names.append(f"manylinux2014_{self.arch}")
        if self.arch in {"x86_64", "i686"}:
            names += [f"manylinux2010_{self.arch}", f"manylinux1_{self.arch}"]
        names.append(f"linux_{self.arch}")
        return names

    def accepted_tags(self) -> frozenset[tags.Tag]:
        platforms = self.platforms
        return frozenset(tags.cpython_tags(self.python, abis=[self.python_tag], platforms=platforms)) | frozenset(
            tags.compatible_tags(self.python, interpreter=self.python_tag, platforms=platforms)
        )

    @property
    def python_version(self) -> Version:
        return Version(f"{self.python[0]}.{self.python[1]}")


def parse_python_version(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text)
    if not match:
        raise ValueError(f"python_version {text!r} is not MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class PipSources:
    indexes: tuple[str, ...]  # PEP 503 base URLs: <base>/<project>/
    find_links: tuple[str, ...]  # pages (or directories) whose links are the files


PIP_VALUE_OPTIONS = {
    "--index-url": "index",
    "-i": "index",
    "--extra-index-url": "extra",
    "--find-links": "links",
    "-f": "links",
}


def parse_pip_options(text: str) -> PipSources:
    """The package sources a `pip install $PIP_OPTIONS ...` uses; other options are not about sources."""
    words = shlex.split(text)
    index: str | None = PYPI_SIMPLE
    extra: list[str] = []
    links: list[str] = []
    no_index = False
    position = 0
    while position < len(words):
        word = words[position]
        position += 1
        if word == "--no-index":
            no_index = True
            continue
        if word.startswith("--") and "=" in word:
            option, value = word.split("=", 1)
        elif word in PIP_VALUE_OPTIONS:
            if position >= len(words):
                raise ValueError(f"pip_options: {word} needs a URL")
            option, value = word, words[position]
            position += 1
        elif word[:2] in {"-i", "-f"} and len(word) > 2:
            option, value = word[:2], word[2:]
        else:
            continue
        kind = PIP_VALUE_OPTIONS.get(option)
        if kind == "index":
            index = value
        elif kind == "extra":
            extra.append(value)
        elif kind == "links":
            links.append(value)
    indexes = () if no_index else tuple(url for url in (index, *extra) if url)
    return PipSources(indexes, tuple(links))
