"""Preflight of ``webllm_version`` / ``webllm_integrity``: the npm registry knows the version and its
``dist.integrity`` is the pinned one."""

from __future__ import annotations

from llm2wasm.host.pins import Profile
from llm2wasm.host.preflight.fetching import Fetcher, PreflightResult, SourceFailed, _as_version, nearest_versions

WEBLLM_PACKAGE = "@mlc-ai/web-llm"
# The abbreviated packument is much smaller and still carries dist.integrity.
NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8"


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
