"""Pure helpers behind the testinfra checks in verify/ (unit-tested in tests/unit)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

UNKNOWN_COMMITS = {"", "NOT-FOUND", "NOT_FOUND", "UNKNOWN", "NONE"}


def env_dict(env_list: list[str] | None) -> dict[str, str]:
    """Docker's Config.Env (["K=V", ...]) as a dict."""
    result = {}
    for item in env_list or []:
        key, _, value = item.partition("=")
        result[key] = value
    return result


def bad_path_entries(value: str) -> list[str]:
    """Entries of a PATH-like value that cannot be right: empty (means the current directory),
    relative, or carrying '=' or spaces (what `ENV PATH = /a:/b` leaves behind)."""
    bad = []
    for entry in value.split(":"):
        if entry == "" or not entry.startswith("/") or "=" in entry or " " in entry:
            bad.append(entry)
    return bad


def env_garbage(env: dict[str, str]) -> list[str]:
    """Variables set by a malformed ENV line: an empty name, or a value starting with '= '."""
    return [key for key, value in env.items() if not key or value.startswith("=") or key != key.strip()]


EMCC_VERSION = re.compile(r"^emcc \(Emscripten gcc/clang-like replacement[^)]*\) (\d+\.\d+\.\d+)")


def emcc_version(first_line: str) -> str | None:
    match = EMCC_VERSION.match(first_line.strip())
    return match.group(1) if match else None


def requirement_pin(requirement: str) -> tuple[str, str | None]:
    """'mlc-ai-cu128==0.20.0' -> ('mlc-ai-cu128', '0.20.0'); 'mlc-llm-nightly-cu128' -> (name, None)."""
    parsed = Requirement(requirement)
    exact = [spec.version for spec in parsed.specifier if spec.operator in ("==", "===")]
    return normalize(parsed.name), exact[0] if exact else None


def normalize(name: str) -> str:
    return canonicalize_name(name)


def version_matches(installed: str, pinned: str) -> bool:
    """PEP 440 ==: a pinned public version matches an installed local build ('2.13.0+cpu')."""
    try:
        return Version(installed) in SpecifierSet(f"=={pinned}")
    except (InvalidVersion, InvalidSpecifier):
        return installed == pinned


def lock_mismatches(installed: dict[str, str], locked: dict[str, str]) -> list[str]:
    """What differs from a hash lock (llm2wasm.host.locks): each locked package missing, or installed
    at another version (a later install that moved it: the lock's hashes no longer describe it)."""
    found = {normalize(name): version for name, version in installed.items()}
    problems = []
    for name, version in sorted(locked.items()):
        have = found.get(normalize(name))
        if have is None:
            problems.append(f"{name} {version} is locked but not installed")
        elif not version_matches(have, version):
            problems.append(f"{name} {have} is installed, the lock has {version}")
    return problems


@dataclass(frozen=True)
class CommitCheck:
    status: str  # "match" | "mismatch" | "unknown"
    message: str


def tvm_commit_check(
    libinfo_commit: str | None,
    source_commit: str | None,
    installed_version: str | None = None,
    release_tag_commit: str | None = None,
) -> CommitCheck:
    """Is the web runtime built from the TVM commit the installed TVM was built from?

    What the installed TVM says, in order: the GIT_COMMIT_HASH of `tvm.support.libinfo()` (older
    mlc-ai builds; "NOT-FOUND" when unknown; apache/tvm removed libinfo() on 2026-04-30); a
    `+g<hash>` local version (nightly builds); for a release X.Y.Z, the commit its tag vX.Y.Z
    names in the web runtime's TVM repository (`release_tag_commit`; the MLC stable wheels are
    built from the relax tag of their version). A mismatch means model libraries fail to load in
    the browser (LinkError or "Cannot find global function")."""
    source = (source_commit or "").strip()
    built = (libinfo_commit or "").strip()
    how = "libinfo GIT_COMMIT_HASH"
    version = (installed_version or "").strip()
    if built.upper() in UNKNOWN_COMMITS and "+g" in version:
        built, how = version.split("+g", 1)[1].split(".")[0], f"version {version}"
    if built.upper() in UNKNOWN_COMMITS and release_tag_commit:
        built, how = release_tag_commit.strip(), f"release {version}: its tag v{version}"
    if built.upper() in UNKNOWN_COMMITS or not source:
        return CommitCheck(
            "unknown",
            f"cannot compare: the installed TVM {version or '?'} names no commit (no libinfo, no +g<hash>, "
            f"no tag v{version or '?'} in the web runtime's TVM repository); web runtime source {source or 'absent'}",
        )
    if built.startswith(source) or source.startswith(built):
        return CommitCheck("match", f"web runtime built from {source}, the installed TVM's commit ({how})")
    return CommitCheck(
        "mismatch",
        f"installed TVM was built from {built} ({how}) but the web runtime from {source}: "
        "pin mlc_llm_ref to the mlc-llm commit whose 3rdparty/tvm matches the wheels",
    )


def expected_os(base_image: str) -> tuple[str, str]:
    """'ubuntu:24.04' -> ('ubuntu', '24.04'); 'llm2wasm-hermetic/debian:bookworm' -> ('debian', 'bookworm')."""
    ref = base_image.split("@", 1)[0]
    name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
    return name.split("/")[-1], tag


# What the web-runtime layer keeps of its build (images/web-runtime/Dockerfile): the runtimes'
# output folders, relative to MLC_LLM_SOURCE_DIR, and the record of the commits they came from.
WEB_RUNTIME_KEPT_FOLDERS = ("web/dist/wasm/", "3rdparty/tvm/web/dist/wasm/")
BUILT_FROM = "BUILT_FROM"


def parse_built_from(text: str) -> dict[str, str]:
    """The web-runtime layer's BUILT_FROM record (KEY=value lines) as a dict."""
    record = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            record[key.strip()] = value.strip()
    return record


def tag_commit(built_from: dict[str, str], tag: str) -> str | None:
    """The commit a tag of the TVM checkout points at, from BUILT_FROM's TVM_TAGS ('v0.26.0=<sha> ...')."""
    for entry in built_from.get("TVM_TAGS", "").split():
        name, _, commit = entry.partition("=")
        if name == tag:
            return commit
    return None


def unexpected_web_runtime_files(relative_paths: list[str]) -> list[str]:
    """Files under MLC_LLM_SOURCE_DIR that are neither a runtime output nor the BUILT_FROM record:
    sources, objects of the build, git histories left behind."""
    return sorted(
        path for path in relative_paths if path != BUILT_FROM and not path.startswith(WEB_RUNTIME_KEPT_FOLDERS)
    )


# Labels that record what a build was pinned to (images/*/Dockerfile, fed from the preflight).
EMSDK_COMMIT_LABEL = "io.llm2wasm.emsdk.commit"
MLC_LLM_COMMIT_LABEL = "io.llm2wasm.mlc-llm.commit"
BASE_NAME_LABEL = "org.opencontainers.image.base.name"
BASE_DIGEST_LABEL = "org.opencontainers.image.base.digest"
FULL_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def commit_label_check(label: str | None, built_from_commit: str | None, what: str) -> CommitCheck:
    """Does a layer's commit label (the commit the preflight found the ref at, which the build checked
    its clone against) name the commit the layer was really built from (read off git in the build)?

    "unrecorded" when the label is empty or absent: the build ran with --no-preflight."""
    label, built = (label or "").strip(), (built_from_commit or "").strip()
    if not label:
        return CommitCheck("unrecorded", f"no {what} commit recorded in the label: built with --no-preflight")
    if not FULL_COMMIT.fullmatch(label):
        return CommitCheck("mismatch", f"the {what} commit label {label!r} is not a full commit id")
    if label != built:
        return CommitCheck(
            "mismatch", f"the label records {what} commit {label}, but the layer was built from {built or 'nothing'}"
        )
    return CommitCheck("match", f"{what} built from {built}, the commit its label records")


def base_image_label_problems(labels: dict[str, str] | None, base_image: str) -> list[str]:
    """What is wrong with the base layer's record of its base image: base.name must be the pin, and
    base.digest a sha256 digest (empty only for a build by tag, --no-preflight), the pin's own digest
    when it names one."""
    labels = labels or {}
    problems = []
    name, digest = labels.get(BASE_NAME_LABEL), (labels.get(BASE_DIGEST_LABEL) or "").strip()
    if name != base_image:
        problems.append(f"{BASE_NAME_LABEL} is {name!r}, not the pin base_image={base_image!r}")
    if digest and not SHA256_DIGEST.fullmatch(digest):
        problems.append(f"{BASE_DIGEST_LABEL} {digest!r} is not a sha256 digest")
    pinned_digest = base_image.partition("@")[2]
    if pinned_digest and digest != pinned_digest:
        problems.append(f"{BASE_DIGEST_LABEL} is {digest!r}, but the pin names {pinned_digest}")
    return problems
