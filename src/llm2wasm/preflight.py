"""Preflight: check in seconds that every remote pin of a profile resolves, before a half-hour build.

A build of the image chain fails late, and with an upstream message, when a pin names something that does
not exist. Preflight asks each source directly and, on failure, names the pin, what it asked for, and the
nearest things that do exist:

- ``base_image``: the registry's v2 API (with an anonymous bearer token when the registry asks for one):
  the tag or digest exists and, for a multi-platform image, has this host's linux platform;
- ``mlc_ai_requirement`` / ``mlc_llm_requirement`` on the flat find-links page ``mlc_wheel_index``, and the
  other requirements on the indexes ``pip_options`` names (PyPI by default): a release matches the specifier
  and has a file the image's Python (``python_version``) can install on linux for this host's architecture;
- ``emsdk_ref`` (only when ``emscripten_source`` is "emsdk") and ``mlc_llm_ref``: a tag or branch of the
  repository, via ``git ls-remote``;
- ``webllm_version`` / ``webllm_integrity``: the npm registry knows the version and its ``dist.integrity``
  is the pinned one.

Each URL is fetched once per run, the checks run concurrently, and an unreachable source is one
"cannot reach" result rather than a traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import re
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urlencode, urljoin, urlsplit

import requests
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
from requests.adapters import HTTPAdapter
from requests.utils import parse_header_links
from urllib3.util.retry import Retry

from .pins import Profile

PYPI_SIMPLE = "https://pypi.org/simple/"
DOCKER_HUB = "registry-1.docker.io"
WEBLLM_PACKAGE = "@mlc-ai/web-llm"

HTTP_TIMEOUT = (5.0, 15.0)  # (connect, read) seconds
GIT_TIMEOUT = 20.0
WORKERS = 16  # enough for every check of a profile at once: they wait on the network, not the CPU
# PyPI's page for torch is a few MB; far larger is not a project page.
MAX_PAGE_BYTES = 64 * 2**20
# An index's root listing only feeds "similar:" suggestions; PyPI's is far larger and is skipped.
MAX_ROOT_LISTING_BYTES = 4 * 2**20
MAX_TAG_PAGES = 50
SHOWN = 5  # how many "nearest" alternatives a message names

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

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
# Registries on the loopback interface serve plain http (Docker treats them as insecure by default).
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# The abbreviated packument is much smaller and still carries dist.integrity.
NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8"

COMMIT_ID = re.compile(r"[0-9a-fA-F]{7,40}")
UNREACHABLE_FIX = "check the network (and proxy settings), or --set the pin to a source this host can reach"


@dataclass(frozen=True)
class PreflightResult:
    pins: tuple[str, ...]
    ok: bool
    message: str
    fix: str = ""
    source: str = ""


class SourceFailed(Exception):
    """A source could not be read at all: the whole check becomes this one message."""

    def __init__(self, source: str, message: str):
        super().__init__(message)
        self.source = source
        self.message = message

    @classmethod
    def unreachable(cls, source: str, reason: str) -> SourceFailed:
        return cls(source, f"cannot reach {source}: {reason}")

    @classmethod
    def http_status(cls, url: str, status: int) -> SourceFailed:
        return cls(url, f"{url} answered HTTP {status}")

    def result(self, pins: tuple[str, ...]) -> PreflightResult:
        return PreflightResult(pins, False, self.message, UNREACHABLE_FIX, self.source)


# --- HTTP ------------------------------------------------------------------------------------------


def make_session() -> requests.Session:
    """A session that retries briefly: a flaky answer is retried, a dead host does not stall the run."""
    retry = Retry(
        total=2,
        backoff_factor=0.2,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        # give back the last answer (reported as "HTTP 503") instead of raising
        raise_on_status=False,
        # a rate-limited registry may ask for minutes; preflight reports instead of waiting
        respect_retry_after_header=False,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "llm2wasm-preflight"
    return session


@dataclass(frozen=True)
class Page:
    url: str  # after redirects: relative links resolve against it
    status: int
    headers: Mapping[str, str]
    body: bytes
    truncated: bool = False

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise SourceFailed(self.url, f"{self.url} did not answer JSON") from None


class _Once:
    """Computes each key once, even when threads ask at the same time; later askers share the outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[Any, Future] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            future = self._futures.get(key)
            owner = future is None
            if owner:
                future = self._futures[key] = Future()
        if owner:
            try:
                future.set_result(compute())
            except BaseException as exc:
                future.set_exception(exc)
        return future.result()


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


def short_reason(exc: BaseException) -> str:
    """'connection refused', 'name or service not known', 'timed out' ... from requests' nested exceptions."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake or certificate failed"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
        return "not an http(s) URL"
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror[0].lower() + current.strerror[1:]
        if "timed out" in str(current).lower():
            return "timed out"
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return type(exc).__name__


class Fetcher:
    """GETs through one session; each URL (with its headers) is fetched once per run."""

    def __init__(self, session: requests.Session, timeout: float | tuple[float, float]):
        self._session = session
        self._timeout = timeout
        self._once = _Once()

    def get(self, url: str, headers: Mapping[str, str] | None = None, max_bytes: int = MAX_PAGE_BYTES) -> Page:
        headers = dict(headers or {})
        key = ("GET", url, tuple(sorted(headers.items())), max_bytes)
        return self._once.get(key, lambda: self._fetch(url, headers, max_bytes))

    def once(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Memoise anything derived from pages (parsed link lists, tokens) for this run."""
        return self._once.get(("derived", key), compute)

    def _fetch(self, url: str, headers: dict[str, str], max_bytes: int) -> Page:
        try:
            with self._session.get(url, headers=headers, timeout=self._timeout, stream=True) as response:
                body = bytearray()
                truncated = False
                for chunk in response.iter_content(64 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        truncated = True
                        break
                return Page(response.url, response.status_code, response.headers, bytes(body), truncated)
        except requests.RequestException as exc:
            # named by host, not URL: the pins that use one dead host then share one result
            raise SourceFailed.unreachable(origin_of(url), short_reason(exc)) from None


# --- nearest alternatives --------------------------------------------------------------------------


def nearest_names(wanted: str, names: Iterable[str], n: int = SHOWN) -> list[str]:
    return difflib.get_close_matches(wanted, sorted(set(names)), n=n, cutoff=0.5)


def nearest_versions(target: Version | None, versions: Iterable[Version], n: int = SHOWN) -> list[Version]:
    """Versions sharing the longest release prefix with the target first, then the smallest step away
    at the first difference, newer first on ties; newest first when there is no target."""
    newest_first = sorted(set(versions), reverse=True)
    if target is None:
        return newest_first[:n]

    def distance(version: Version) -> tuple[int, int]:
        mine, theirs = version.release, target.release
        width = max(len(mine), len(theirs))
        mine, theirs = mine + (0,) * (width - len(mine)), theirs + (0,) * (width - len(theirs))
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a != b:
                return (-index, abs(a - b))
        return (-width, 0)

    return sorted(newest_first, key=distance)[:n]  # sorted() is stable: ties stay newest first


def _as_version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


# --- base image ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageReference:
    registry: str  # host[:port] to contact
    repository: str  # "library/ubuntu"
    reference: str  # a tag or a digest
    written_name: str  # the name as pinned, without tag or digest (for fix hints)

    @property
    def is_digest(self) -> bool:
        return ":" in self.reference

    @property
    def base_url(self) -> str:
        host = self.registry
        if host.startswith("["):
            host = host[1 : host.index("]")]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        scheme = "http" if host in LOOPBACK_HOSTS else "https"
        return f"{scheme}://{self.registry}"

    @property
    def display(self) -> str:
        return f"{self.registry}/{self.repository}"


def parse_image_reference(text: str) -> ImageReference:
    """Docker's rules: the first path component names a registry host only when it has a '.' or ':',
    is 'localhost', or has upper case; otherwise the image is on Docker Hub, where single names are
    official images under library/."""
    name, _, digest = text.strip().partition("@")
    tag = ""
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry in {"docker.io", "index.docker.io"}:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return ImageReference(registry, repository, digest or tag or "latest", name)


def docker_arch(machine: str) -> str:
    wheel = wheel_arch(machine)
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm"}.get(wheel, wheel)


def wheel_arch(machine: str) -> str:
    machine = machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _bearer_challenge(header: str) -> dict[str, str] | None:
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def _anonymous_token(fetcher: Fetcher, challenge: dict[str, str]) -> str | None:
    realm = challenge.get("realm")
    if not realm:
        return None
    query = urlencode({key: value for key, value in challenge.items() if key in {"service", "scope"}})
    separator = "&" if "?" in realm else "?"
    page = fetcher.get(f"{realm}{separator}{query}" if query else realm)
    if page.status != 200:
        return None
    body = page.json()
    return body.get("token") or body.get("access_token") if isinstance(body, dict) else None


def _registry_get(fetcher: Fetcher, url: str, accept: str) -> Page:
    """GET, answering a 401 Bearer challenge with an anonymous token (how public images are pulled)."""
    page = fetcher.get(url, {"Accept": accept})
    if page.status != 401:
        return page
    challenge = _bearer_challenge(page.headers.get("WWW-Authenticate", ""))
    token = _anonymous_token(fetcher, challenge) if challenge else None
    if not token:
        return page
    return fetcher.get(url, {"Accept": accept, "Authorization": f"Bearer {token}"})


def _registry_error_codes(page: Page) -> set[str]:
    try:
        errors = json.loads(page.body).get("errors") or []
        return {str(error.get("code")) for error in errors}
    except (ValueError, AttributeError):
        return set()


def _registry_tags(fetcher: Fetcher, image: ImageReference) -> list[str] | None:
    """All tags (following Link pagination), or None when the registry does not know the repository."""
    url: str | None = f"{image.base_url}/v2/{image.repository}/tags/list"
    found: list[str] = []
    for _ in range(MAX_TAG_PAGES):
        if url is None:
            break
        page = _registry_get(fetcher, url, "application/json")
        if page.status in (401, 404):
            return None
        if page.status != 200:
            raise SourceFailed.http_status(url, page.status)
        found.extend((page.json() or {}).get("tags") or [])
        next_links = [link for link in parse_header_links(page.headers.get("Link", "")) if link.get("rel") == "next"]
        url = urljoin(page.url, next_links[0]["url"]) if next_links else None
    return found


def check_base_image(fetcher: Fetcher, profile: Profile, machine: str) -> list[PreflightResult]:
    pins = ("base_image",)
    pinned = str(profile.get("base_image") or "").strip()
    image = parse_image_reference(pinned)
    if not image.written_name:
        return [PreflightResult(pins, False, "base_image is empty", "--set base_image=NAME:TAG")]
    where = image.display
    url = f"{image.base_url}/v2/{image.repository}/manifests/{image.reference}"
    page = _registry_get(fetcher, url, MANIFEST_ACCEPT)

    if page.status == 200:
        return [_check_image_platform(pinned, where, page, docker_arch(machine))]
    no_repository = PreflightResult(
        pins,
        False,
        f"base_image {pinned}: no repository {image.repository} in {image.registry} (or it needs a login)",
        "check the image name: --set base_image=NAME:TAG",
        url,
    )
    # Docker Hub answers 401, not 404, for a repository that does not exist.
    if page.status == 401 or "NAME_UNKNOWN" in _registry_error_codes(page):
        return [no_repository]
    if page.status != 404:
        raise SourceFailed.http_status(url, page.status)
    if image.is_digest:
        return [
            PreflightResult(
                pins,
                False,
                f"base_image {pinned}: no manifest {image.reference} in {where}",
                "pin a digest taken from a real pull, or a tag",
                url,
            )
        ]
    existing = _registry_tags(fetcher, image)
    if existing is None:
        return [no_repository]
    nearest = nearest_names(image.reference, existing)
    hint = f"nearest: {', '.join(nearest)}" if nearest else f"{len(existing)} tags exist, none similar"
    fix = f"pin an existing tag: --set base_image={image.written_name}:{nearest[0]}" if nearest else ""
    return [PreflightResult(pins, False, f"base_image {pinned}: no such tag in {where}; {hint}", fix, url)]


def _check_image_platform(pinned: str, where: str, page: Page, arch: str) -> PreflightResult:
    pins = ("base_image",)
    body = page.json()
    media_type = page.headers.get("Content-Type", "").split(";")[0].strip() or body.get("mediaType", "")
    manifests = body.get("manifests")
    if media_type not in (OCI_INDEX, DOCKER_MANIFEST_LIST) and not isinstance(manifests, list):
        return PreflightResult(pins, True, f"base_image {pinned}: found in {where} (one platform)", source=page.url)
    platforms = [entry.get("platform") or {} for entry in manifests or []]
    if any(item.get("os") == "linux" and item.get("architecture") == arch for item in platforms):
        return PreflightResult(pins, True, f"base_image {pinned}: linux/{arch} in {where}", source=page.url)
    # attestation manifests carry unknown/unknown: not a platform anyone can pull
    offered = sorted(
        {
            "/".join(part for part in (item.get("os"), item.get("architecture"), item.get("variant")) if part)
            for item in platforms
            if item.get("os") not in (None, "unknown")
        }
    )
    return PreflightResult(
        pins,
        False,
        f"base_image {pinned} has no linux/{arch} image in {where}; platforms: {', '.join(offered) or 'none'}",
        f"pin an image built for linux/{arch}, or build on a host of one of its platforms",
        page.url,
    )


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


# --- git -------------------------------------------------------------------------------------------


def _git_refs(fetcher: Fetcher, git: str, repo: str, timeout: float) -> dict[str, str]:
    """Ref name -> commit for every tag and branch of repo; one `git ls-remote` per repository per run."""

    def list_refs() -> dict[str, str]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")  # never wait for a password or host key
        try:
            completed = subprocess.run(
                [git, "ls-remote", "--tags", "--heads", repo],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise SourceFailed.unreachable(repo, f"no answer in {timeout:g} s") from None
        except OSError as exc:
            raise SourceFailed(repo, f"cannot run {git} ls-remote: {exc.strerror or exc}") from None
        if completed.returncode != 0:
            lines = [line.strip().removeprefix("fatal: ") for line in completed.stderr.splitlines() if line.strip()]
            reason = " ".join(lines)[:200] or f"git ls-remote exited with {completed.returncode}"
            raise SourceFailed.unreachable(repo, reason)
        refs = {}
        for line in completed.stdout.splitlines():
            commit, _, name = line.partition("\t")
            refs[name.strip()] = commit.strip()
        return refs

    return fetcher.once(("git", git, repo), list_refs)


def check_git_ref(
    fetcher: Fetcher, profile: Profile, repo_pin: str, ref_pin: str, git: str, timeout: float
) -> list[PreflightResult]:
    pins = (repo_pin, ref_pin)
    repo, ref = str(profile.get(repo_pin) or ""), str(profile.get(ref_pin) or "")
    refs = _git_refs(fetcher, git, repo, timeout)
    for kind, prefix in (("branch", "refs/heads/"), ("tag", "refs/tags/")):
        commit = refs.get(prefix + ref)
        if commit:
            return [PreflightResult(pins, True, f"{ref_pin} {ref}: {kind} in {repo} ({commit[:12]})", source=repo)]
    if COMMIT_ID.fullmatch(ref):
        # The layers clone with `git clone --depth 1 --branch REF`, which takes tags and branches only.
        tagged = sorted(
            name.removeprefix("refs/tags/").removesuffix("^{}")
            for name, commit in refs.items()
            if commit.startswith(ref.lower()) and name.startswith("refs/tags/")
        )
        fix = f"pin the tag instead: --set {ref_pin}={tagged[0]}" if tagged else "pin a tag or branch at that commit"
        message = f"{ref_pin} {ref}: a commit id, but the build clones a tag or branch (git clone --branch)"
        return [PreflightResult(pins, False, message, fix, repo)]
    names = {name.removeprefix("refs/tags/").removeprefix("refs/heads/").removesuffix("^{}") for name in refs}
    nearest = nearest_names(ref, names)
    hint = f"nearest: {', '.join(nearest)}" if nearest else f"{len(names)} tags and branches exist, none similar"
    fix = f"pin an existing tag or branch: --set {ref_pin}={nearest[0]}" if nearest else ""
    return [PreflightResult(pins, False, f"{ref_pin} {ref}: no such tag or branch in {repo}; {hint}", fix, repo)]


# --- npm -------------------------------------------------------------------------------------------


def check_webllm(fetcher: Fetcher, profile: Profile) -> list[PreflightResult]:
    pins = ("npm_registry", "webllm_version", "webllm_integrity")
    registry = str(profile.get("npm_registry") or "").rstrip("/")
    version = str(profile.get("webllm_version") or "")
    pinned_integrity = str(profile.get("webllm_integrity") or "")
    url = f"{registry}/{WEBLLM_PACKAGE}"
    page = fetcher.get(url, {"Accept": NPM_ACCEPT})
    if page.status == 404:
        return [PreflightResult(pins, False, f"npm_registry {registry} has no package {WEBLLM_PACKAGE}", "", url)]
    if page.status != 200:
        raise SourceFailed.http_status(url, page.status)
    packument = page.json()
    versions = packument.get("versions") if isinstance(packument, dict) else None
    if not isinstance(versions, dict):
        raise SourceFailed(url, f"{url} is not an npm package document (no versions)")

    if version not in versions:
        parsed = {v: text for text in versions if (v := _as_version(text)) is not None}
        nearest = [parsed[v] for v in nearest_versions(_as_version(version), parsed)]
        return [
            PreflightResult(
                pins,
                False,
                f"webllm_version {version}: no such version of {WEBLLM_PACKAGE} in {registry}; "
                f"nearest: {', '.join(nearest) or 'none'}",
                f"--set webllm_version={nearest[0]} with that version's webllm_integrity" if nearest else "",
                url,
            )
        ]
    integrity = ((versions[version] or {}).get("dist") or {}).get("integrity", "")
    if not integrity:
        message = f"webllm_version {version}: {registry} gives no dist.integrity to compare with"
        return [PreflightResult(pins, False, message, "", url)]
    if integrity != pinned_integrity:
        return [
            PreflightResult(
                pins,
                False,
                f"webllm_integrity does not match {WEBLLM_PACKAGE} {version} in {registry}: "
                f"pinned {pinned_integrity or '(empty)'}, registry {integrity}",
                f"if {version} is the version you want: --set webllm_integrity={integrity}",
                url,
            )
        ]
    message = f"webllm_version {version}: {WEBLLM_PACKAGE} in {registry}, integrity matches"
    return [PreflightResult(pins, True, message, source=url)]


# --- running ---------------------------------------------------------------------------------------


def _guarded(pins: tuple[str, ...], check: Callable[[], list[PreflightResult]]) -> list[PreflightResult]:
    try:
        return check()
    except SourceFailed as failure:
        return [failure.result(pins)]
    except Exception as exc:  # one odd answer must not hide the other checks' results
        return [PreflightResult(pins, False, f"{', '.join(pins)}: could not check: {type(exc).__name__}: {exc}")]


def _merge_same_failures(results: list[PreflightResult]) -> list[PreflightResult]:
    """One result per failed source: pins that fail with the same message share it."""
    merged: list[PreflightResult] = []
    index_of: dict[tuple[str, str], int] = {}
    for result in results:
        key = (result.message, result.source)
        if result.ok or key not in index_of:
            if not result.ok:
                index_of[key] = len(merged)
            merged.append(result)
            continue
        earlier = merged[index_of[key]]
        pins = tuple(dict.fromkeys((*earlier.pins, *result.pins)))
        merged[index_of[key]] = PreflightResult(pins, False, earlier.message, earlier.fix, earlier.source)
    return merged


def run_preflight(
    profile: Profile,
    *,
    session: requests.Session | None = None,
    git: str = "git",
    timeout: float | tuple[float, float] = HTTP_TIMEOUT,
    git_timeout: float = GIT_TIMEOUT,
    machine: str | None = None,
) -> list[PreflightResult]:
    """Check every remote pin of profile; results in a fixed order (image, wheels, git, npm)."""
    machine = machine or platform.machine()
    own_session = session is None
    http = session or make_session()
    fetcher = Fetcher(http, timeout)
    tasks: list[tuple[tuple[str, ...], Callable[[], list[PreflightResult]]]] = []
    early: list[PreflightResult] = []

    tasks.append((("base_image",), lambda: check_base_image(fetcher, profile, machine)))

    try:
        target = Target(parse_python_version(str(profile.get("python_version", ""))), wheel_arch(machine))
    except ValueError as exc:
        early.append(PreflightResult(("python_version",), False, str(exc), "--set python_version=3.12"))
        target = None
    try:
        pip_sources = parse_pip_options(str(profile.get("pip_options") or ""))
    except ValueError as exc:
        early.append(PreflightResult(("pip_options",), False, f"pip_options: {exc}"))
        pip_sources = None
    mlc_index = str(profile.get("mlc_wheel_index") or "").strip()
    if not mlc_index:
        early.append(
            PreflightResult(("mlc_wheel_index",), False, "mlc_wheel_index is empty", "--set mlc_wheel_index=URL")
        )
    if target is not None:
        wheel_pins = [(pin, PipSources((), (mlc_index,))) for pin in MLC_WHEEL_PINS] if mlc_index else []
        if pip_sources is not None:
            wheel_pins += [(pin, pip_sources) for pin in PIP_PINS]
        for pin, sources in wheel_pins:
            requirement = profile.get(pin)
            if requirement:
                tasks.append(
                    ((pin,), lambda p=pin, r=str(requirement), s=sources: check_requirement(fetcher, p, r, s, target))
                )
        if pip_sources is not None and profile.cuda:
            tasks.append(
                (("torch_requirement", "variant"), lambda: check_cuda_major(fetcher, profile, pip_sources, target))
            )

    git_pins = [("mlc_llm_repo", "mlc_llm_ref")]
    if profile.get("emscripten_source", "emsdk") == "emsdk":
        git_pins.insert(0, ("emsdk_repo", "emsdk_ref"))
    for repo_pin, ref_pin in git_pins:
        if profile.get(repo_pin) and profile.get(ref_pin):
            tasks.append(
                (
                    (repo_pin, ref_pin),
                    lambda a=repo_pin, b=ref_pin: check_git_ref(fetcher, profile, a, b, git, git_timeout),
                )
            )

    if profile.get("npm_registry") and profile.get("webllm_version"):
        tasks.append((("npm_registry", "webllm_version", "webllm_integrity"), lambda: check_webllm(fetcher, profile)))

    try:
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="preflight") as pool:
            futures = [pool.submit(_guarded, pins, check) for pins, check in tasks]
            results = [*early, *(result for future in futures for result in future.result())]
    finally:
        if own_session:
            http.close()
    return _merge_same_failures(results)


def format_results(results: Iterable[PreflightResult]) -> tuple[str, bool]:
    """In doctor's layout: 'ok  ...' / 'NO  ...' with the fix under each problem; and all ok?"""
    from .doctor import report_lines

    return report_lines((result.ok, result.message, result.fix) for result in results)


def for_layers(results: Iterable[PreflightResult], layer_names: Iterable[str]) -> list[PreflightResult]:
    """The results that matter for building these layers: a pin only a later layer uses (say the
    app layer's WebLLM, when building --until ml) does not stop the build."""
    from .layers import LAYERS

    used_by_some_layer = {pin for layer in LAYERS for pin in layer.build_args.values()}
    wanted = {pin for layer in LAYERS if layer.name in set(layer_names) for pin in layer.build_args.values()}
    return [result for result in results if any(pin in wanted or pin not in used_by_some_layer for pin in result.pins)]


def preflight_or_stop(profile: Profile, layer_names: Iterable[str], say: Callable[[str], None]) -> None:
    """Run the preflight for a build; raise UsageError (exit 2) naming every pin that does not resolve."""
    import time

    from .errors import UsageError

    started = time.monotonic()
    say(f"==> preflight: do the remote pins of profile {profile.name} resolve? (skip: --no-preflight)")
    results = for_layers(run_preflight(profile), layer_names)
    text, healthy = format_results(results)
    if not healthy:
        raise UsageError(
            f"preflight: pins of profile {profile.name} do not resolve; nothing was built.\n{text}\n"
            "Fix the pins (images/pins.toml or --set KEY=VALUE), or skip this check with --no-preflight."
        )
    say(f"<== preflight: {len(results)} checks passed in {time.monotonic() - started:.1f}s")
