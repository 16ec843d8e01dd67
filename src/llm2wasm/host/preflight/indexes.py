"""What a package source offers a project: the files on a PEP 503 index's project page or on a
find-links page, read into candidates (a wheel with its tags, or an sdist), and the project names an
index lists (for "similar:" suggestions).

Only reading: which candidate pip would install, and what to say when none fits, is
llm2wasm.host.preflight.wheels (and llm2wasm.host.preflight.torchcuda for torch's CUDA major).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from packaging import tags
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from llm2wasm.host.preflight.fetching import MAX_PAGE_BYTES, Fetcher, Page, SourceFailed

# An index's root listing only feeds "similar:" suggestions; PyPI's is far larger and is skipped.
MAX_ROOT_LISTING_BYTES = 4 * 2**20


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
class Found:
    """A project's files across the sources, and the sources that could not say."""

    candidates: list[Candidate]
    failures: list[SourceFailed]
    unchecked: list[str]  # sources that are not http(s): pip reads them inside the build
    other_projects: list[str]  # for "similar:" when the project is nowhere


def _page_links(fetcher: Fetcher, url: str, max_bytes: int = MAX_PAGE_BYTES) -> tuple[Page, list[Link]]:
    page = fetcher.get(url, {"Accept": "text/html"}, max_bytes)
    return page, fetcher.once(("links", url, max_bytes), lambda: parse_links(page))


def collect(fetcher: Fetcher, project: str, indexes: Iterable[str], find_links: Iterable[str]) -> Found:
    """Every file of `project` on the find-links pages and the indexes' project pages. A source that
    fails is kept as a failure and one that is not http(s) as unchecked: the caller decides."""
    found = Found([], [], [], [])
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


def index_projects(fetcher: Fetcher, indexes: Iterable[str]) -> list[str]:
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
