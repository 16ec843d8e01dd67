"""What every preflight source shares: the result type, fetching each URL once, short reasons for failures, and
the nearest alternatives a message names."""

from __future__ import annotations

import difflib
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from packaging.version import InvalidVersion, Version
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

# PyPI's page for torch is a few MB; far larger is not a project page.
MAX_PAGE_BYTES = 64 * 2**20
HTTP_TIMEOUT = (5.0, 15.0)  # (connect, read) seconds
SHOWN = 5  # how many "nearest" alternatives a message names
UNREACHABLE_FIX = "check the network (and proxy settings), or --set the pin to a source this host can reach"
# A source on this machine is the hermetic profile's mirror (tests/hermetic), which is either running or not:
# the network has nothing to do with it.
LOCAL_MIRROR_FIX = "start the local mirror the hermetic profile reads: invoke mirror up (invoke mirror status shows it)"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def unreachable_fix(source: str) -> str:
    """What to do when a source cannot be read: a local mirror is started, a remote one is reached."""
    host = urlsplit(source if "://" in source else "//" + source).hostname or ""
    return LOCAL_MIRROR_FIX if host in LOOPBACK_HOSTS else UNREACHABLE_FIX


@dataclass(frozen=True)
class PreflightResult:
    pins: tuple[str, ...]
    ok: bool
    message: str
    fix: str = ""
    source: str = ""
    # What a check that passed resolved a pin to, immutably: (pin, value) pairs, such as the commit a
    # git ref is at or the registry digest of the base image. The build pins itself to these
    # (llm2wasm.host.plan: the layers' *_COMMIT and BASE_IMAGE_DIGEST build arguments).
    resolved: tuple[tuple[str, str], ...] = ()


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
        return PreflightResult(pins, False, self.message, unreachable_fix(self.source), self.source)


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
