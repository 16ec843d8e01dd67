"""Preflight of the wheel pins: ``mlc_ai_requirement`` / ``mlc_llm_requirement`` on the flat find-links page
``mlc_wheel_index``, the other requirements on the indexes ``pip_options`` names (PyPI by default): a release
matches the specifier and has a file the image's Python can install on linux for this host's architecture.
For CUDA profiles, torch's CUDA major (from its wheel's metadata) must be the MLC variant's."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from packaging import tags
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from llm2wasm.host.pins import Profile
from llm2wasm.host.preflight.fetching import (
    MAX_PAGE_BYTES,
    SHOWN,
    Fetcher,
    Page,
    PreflightResult,
    SourceFailed,
    _as_version,
    nearest_names,
    nearest_versions,
)

PYPI_SIMPLE = "https://pypi.org/simple/"
# Installed from the MLC wheel index with `pip download --no-index --find-links`.
MLC_WHEEL_PINS = ("mlc_ai_requirement", "mlc_llm_requirement")
# Installed with `pip install $PIP_OPTIONS`; the last two exist only in some profiles.
PIP_PINS = (
    "torch_requirement",
    "transformers_requirement",
    "peft_requirement",
    "bitsandbytes_requirement",
    "tvm_ffi_requirement",
    "wgsl_validator_requirement",
)
# An index's root listing only feeds "similar:" suggestions; PyPI's is far larger and is skipped.
MAX_ROOT_LISTING_BYTES = 4 * 2**20


# --- wheels ----------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Link:
    url: str
    text: str
    requires_python: str = ""

    @property
    def filename(self) -> str:
        return unquote(urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1])


class _LinkParser(HTMLParser):
    def __init__(self, page_url: str):
        super().__init__()
        self.base = page_url
        self.links: list[Link] = []
        self._open: dict[str, str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "a" and values.get("href"):
            self._open, self._text = values, []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            url = urljoin(self.base, self._open["href"]).split("#", 1)[0]
            text = "".join(self._text).strip()
            self.links.append(Link(url, text, self._open.get("data-requires-python", "")))
            self._open = None


def parse_links(page: Page) -> list[Link]:
    parser = _LinkParser(page.url)
    parser.feed(page.text)
    parser.close()
    return parser.links


@dataclass(frozen=True)
class Candidate:
    """A file pip could pick: a wheel (with its tags) or an sdist (no tags: builds for any Python)."""

    filename: str
    source: str
    project: str
    version: Version
    tags: frozenset[tags.Tag]
    requires_python: str
    url: str = ""

    @property
    def is_wheel(self) -> bool:
        return bool(self.tags)

    def runs_on(self, python: Version) -> bool:
        if not self.requires_python:
            return True
        try:
            return SpecifierSet(self.requires_python).contains(python, prereleases=True)
        except InvalidSpecifier:
            return True  # pip ignores a malformed Requires-Python too


def candidate_from(link: Link, source: str) -> Candidate | None:
    name = link.filename
    try:
        if name.endswith(".whl"):
            project, version, _, file_tags = parse_wheel_filename(name)
            return Candidate(name, source, project, version, frozenset(file_tags), link.requires_python, link.url)
        if name.endswith((".tar.gz", ".zip")):
            project, version = parse_sdist_filename(name)
            return Candidate(name, source, project, version, frozenset(), link.requires_python, link.url)
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        pass  # not a distribution file: pip skips it too
    return None


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme in {"http", "https"}


@dataclass
class _Found:
    candidates: list[Candidate]
    failures: list[SourceFailed]
    unchecked: list[str]  # sources that are not http(s): pip reads them inside the build
    other_projects: list[str]  # for "similar:" when the project is nowhere


def _page_links(fetcher: Fetcher, url: str, max_bytes: int = MAX_PAGE_BYTES) -> tuple[Page, list[Link]]:
    page = fetcher.get(url, {"Accept": "text/html"}, max_bytes)
    return page, fetcher.once(("links", url, max_bytes), lambda: parse_links(page))


def _collect(fetcher: Fetcher, project: str, indexes: Iterable[str], find_links: Iterable[str]) -> _Found:
    found = _Found([], [], [], [])
    for url in find_links:
        if not _is_http(url):
            found.unchecked.append(url)
            continue
        try:
            page, links = _page_links(fetcher, url)
            if page.status != 200:
                raise SourceFailed.http_status(url, page.status)
        except SourceFailed as failure:
            found.failures.append(failure)
            continue
        for link in links:
            candidate = candidate_from(link, url)
            if candidate is None:
                continue
            if candidate.project == project:
                found.candidates.append(candidate)
            else:
                found.other_projects.append(candidate.project)
    for base in indexes:
        if not _is_http(base):
            found.unchecked.append(base)
            continue
        project_url = f"{base.rstrip('/')}/{project}/"
        try:
            page, links = _page_links(fetcher, project_url)
            if page.status == 404:
                continue
            if page.status != 200:
                raise SourceFailed.http_status(project_url, page.status)
        except SourceFailed as failure:
            found.failures.append(failure)
            continue
        found.candidates.extend(
            candidate
            for candidate in (candidate_from(link, base) for link in links)
            if candidate is not None and candidate.project == project
        )
    return found


def _index_projects(fetcher: Fetcher, indexes: Iterable[str]) -> list[str]:
    """Project names from the indexes' root listings, where one is small enough to read."""
    names: list[str] = []
    for base in indexes:
        if not _is_http(base):
            continue
        root = f"{base.rstrip('/')}/"
        try:
            page, links = _page_links(fetcher, root, MAX_ROOT_LISTING_BYTES)
        except SourceFailed:
            continue
        if page.status == 200 and not page.truncated:
            names += [canonicalize_name(link.text or link.filename) for link in links]
    return names


def check_requirement(
    fetcher: Fetcher,
    pin: str,
    requirement_text: str,
    sources: PipSources,
    target: Target,
) -> list[PreflightResult]:
    pins = (pin,)
    try:
        requirement = Requirement(requirement_text)
    except InvalidRequirement as exc:
        return [PreflightResult(pins, False, f"{pin} {requirement_text!r} is not a requirement: {exc}")]
    where = ", ".join((*sources.find_links, *sources.indexes)) or "no package source"
    if requirement.url:
        return [PreflightResult(pins, True, f"{pin} {requirement_text}: a direct URL, fetched at build time")]
    if not sources.find_links and not sources.indexes:
        return [PreflightResult(pins, False, f"{pin} {requirement_text}: pip_options leaves no package source")]

    project = canonicalize_name(requirement.name)
    found = _collect(fetcher, project, sources.indexes, sources.find_links)
    failures = [failure.result(pins) for failure in found.failures]
    verdict = _judge(pin, requirement, found.candidates, target, where)
    if verdict.ok:
        return [verdict, *failures]
    if failures:
        return failures  # a source we could not read may well hold it
    if found.unchecked:
        unchecked = ", ".join(found.unchecked)
        return [PreflightResult(pins, True, f"{pin} {requirement_text}: not checked in {unchecked} (not http)")]
    if not found.candidates:
        similar = nearest_names(project, {*found.other_projects, *_index_projects(fetcher, sources.indexes)})
        hint = f"; similar: {', '.join(similar)}" if similar else ""
        fix = ""
        if similar:
            requirement.name = similar[0]
            fix = f"--set {pin}={requirement}"
        message = f"{pin} {requirement_text}: the index has no project {project} ({where}){hint}"
        return [PreflightResult(pins, False, message, fix, where)]
    return [verdict]


def _judge(
    pin: str, requirement: Requirement, candidates: list[Candidate], target: Target, where: str
) -> PreflightResult:
    """The best installable file, or a failure that says what does exist."""
    pins = (pin,)
    shown = str(requirement)
    specifier = requirement.specifier
    matching = [item for item in candidates if specifier.contains(item.version, prereleases=True)]
    accepted = target.accepted_tags()
    installable = [
        item for item in matching if (not item.is_wheel or item.tags & accepted) and item.runs_on(target.python_version)
    ]
    if installable:
        best = max(installable, key=lambda item: (item.version, item.is_wheel))
        return PreflightResult(pins, True, f"{pin} {shown}: {best.filename} in {best.source}", source=best.source)
    if not candidates:
        return PreflightResult(pins, False, f"{pin} {shown}: not found in {where}", source=where)

    if not matching:
        target_version = _specifier_target(specifier)
        releases = [str(v) for v in nearest_versions(target_version, (item.version for item in candidates))]
        order = " (nearest first)" if target_version else " (newest first)"
        fixed = Requirement(shown)
        fixed.specifier = SpecifierSet(f"=={releases[0]}")
        return PreflightResult(
            pins,
            False,
            f"{pin} {shown}: no release matches {specifier} in {where}; releases: {', '.join(releases)}{order}",
            f"pin an existing release: --set {pin}={fixed}",
            where,
        )

    runnable = [item for item in matching if item.runs_on(target.python_version)]
    if not runnable:
        needs = sorted({item.requires_python for item in matching})
        return PreflightResult(
            pins,
            False,
            f"{pin} {shown}: every matching file needs Python {' or '.join(needs)}, the image has "
            f"{target.python_version} ({where})",
            "pin a release that supports the image's python_version",
            where,
        )
    platform_words = f"linux {target.arch}"
    # what is left are wheels whose tags do not fit (an sdist or a fitting wheel would be installable)
    fitting_platform = [item for item in runnable if _fits_platform(item, target)]
    if fitting_platform:
        interpreters = _nearest_interpreters(
            target, {tag.interpreter for item in fitting_platform for tag in item.tags}
        )
        fix = f"pin a release built for {target.python_tag}"
        if interpreters and re.fullmatch(r"cp3\d+", interpreters[0]):
            fix += f", or the image's Python: --set python_version=3.{interpreters[0][3:]}"
        return PreflightResult(
            pins,
            False,
            f"{pin} {shown} has no {target.python_tag} wheel for {platform_words} in {where}; "
            f"{', '.join(interpreters)} exist{'s' if len(interpreters) == 1 else ''}",
            fix,
            where,
        )
    offered = sorted({tag.platform for item in runnable for tag in item.tags})
    return PreflightResult(
        pins,
        False,
        f"{pin} {shown} has no wheel for {platform_words} in {where}; platforms: {', '.join(offered[:SHOWN])}",
        f"pin a variant with linux {target.arch} wheels, or build on a host of another architecture",
        where,
    )


# ------------------------------------------------------------------ one CUDA major
_CUDA_SUFFIX = re.compile(r"^nvidia-.+-cu(\d+)$")
_LOCAL_CUDA = re.compile(r"^cu(\d+)(\d)$")  # +cu130 -> 13, +cu128 -> 12


def torch_cuda_major(requires_dist: Iterable[str], local_version: str | None) -> tuple[int | None, str]:
    """The CUDA major a torch wheel needs, from its Requires-Dist (Linux x86_64 markers), else its
    local version label; with the requirement or label it was read from. (None, why) for a CPU
    build or when nothing says."""
    environment = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64"}
    for line in requires_dist:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        suffix = _CUDA_SUFFIX.match(name)
        if suffix:
            return int(suffix.group(1)), line.split(";")[0].strip()
        if name in ("cuda-toolkit", "nvidia-cuda-runtime"):
            for spec in requirement.specifier:
                version = _as_version(spec.version.rstrip(".*"))
                if version is not None:
                    return version.major, line.split(";")[0].strip()
    label = _LOCAL_CUDA.match(local_version or "")
    if label:
        return int(label.group(1)), f"+{local_version}"
    if local_version and local_version.startswith(("cpu", "rocm")):
        return None, f"+{local_version} (no CUDA)"
    return None, "no CUDA requirement"


def _metadata_requirements(fetcher: Fetcher, wheel_url: str) -> list[str] | None:
    """Requires-Dist of a wheel from its index's PEP 658 metadata file, without the wheel itself."""
    if not wheel_url:
        return None
    try:
        page = fetcher.get(wheel_url.split("#", 1)[0] + ".metadata", {"Accept": "*/*"}, 2**20)
    except SourceFailed:
        return None
    if page.status != 200:
        return None
    return [line.split(":", 1)[1].strip() for line in page.text.splitlines() if line.startswith("Requires-Dist:")]


def check_cuda_major(fetcher: Fetcher, profile: Profile, sources: PipSources, target: Target) -> list[PreflightResult]:
    """torch, its nvidia-* libraries and the MLC wheels must share one CUDA major: the MLC CUDA
    wheels load libcudart/libcublas of their own major, which only torch's requirements install."""
    pins = ("torch_requirement", "variant")
    wanted = profile.cuda_major
    text = str(profile.get("torch_requirement") or "")
    if wanted is None or not text:
        return []
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        return []  # check_requirement says so
    found = _collect(fetcher, canonicalize_name(requirement.name), sources.indexes, sources.find_links)
    accepted = target.accepted_tags()
    installable = [
        item
        for item in found.candidates
        if item.is_wheel
        and item.tags & accepted
        and item.runs_on(target.python_version)
        and requirement.specifier.contains(item.version, prereleases=True)
    ]
    if not installable:
        return []  # check_requirement names what is missing
    best = max(installable, key=lambda item: item.version)
    requires = _metadata_requirements(fetcher, best.url)
    major, evidence = torch_cuda_major(requires or [], best.version.local)
    variant = profile.get("variant")
    where = f"{text} ({best.filename}"
    where += ", its metadata)" if requires is not None else ")"
    if major == wanted:
        return [
            PreflightResult(pins, True, f"torch_requirement {where}: CUDA {major} ({evidence}), as variant {variant}")
        ]
    needs = f"CUDA {major} ({evidence})" if major is not None else f"no CUDA ({evidence})"
    return [
        PreflightResult(
            pins,
            False,
            f"torch_requirement {where} brings {needs}, but the MLC wheels of variant {variant} are built for "
            f"CUDA {wanted} and need its libraries",
            (
                f"one CUDA major throughout: --set variant=cu{major}0 with the mlc-ai/mlc-llm cu{major}0 "
                f"requirements, or a torch built for CUDA {wanted}"
                if major
                else f"a torch built for CUDA {wanted}, or the MLC CPU wheels (profile cpu)"
            ),
            best.source,
        )
    ]


def _fits_platform(candidate: Candidate, target: Target) -> bool:
    platforms = {*target.platforms, "any"}
    return any(tag.platform in platforms for tag in candidate.tags)


def _nearest_interpreters(target: Target, interpreters: set[str]) -> list[str]:
    def distance(name: str) -> tuple[int, int]:
        match = re.fullmatch(r"cp3(\d+)", name)
        if not match:
            return (1, 0)
        return (0, abs(int(match.group(1)) - target.python[1]) * 2 + (int(match.group(1)) < target.python[1]))

    return sorted(sorted(interpreters, reverse=True), key=distance)[:SHOWN]


def _specifier_target(specifier: SpecifierSet) -> Version | None:
    """The version a specifier aims at ('==0.20.1' -> 0.20.1), to order the releases around it."""
    for item in specifier:
        if item.operator in {"==", "===", "~=", ">=", "<=", ">", "<"}:
            version = _as_version(item.version.removesuffix(".*"))
            if version is not None:
                return version
    return None
