"""Preflight of ``base_image``: the registry's v2 API (with an anonymous bearer token when the registry asks for
one) says the tag or digest exists and, for a multi-platform image, has this host's linux platform; and which
manifest digest it names now, which the build then pulls (``NAME:TAG@sha256:...``) and records in the base
layer's labels."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from urllib.parse import urlencode, urljoin

from requests.utils import parse_header_links

from llm2wasm.host.pins import Profile
from llm2wasm.host.preflight.fetching import Fetcher, Page, PreflightResult, SourceFailed, nearest_names

DOCKER_HUB = "registry-1.docker.io"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
# Registries on the loopback interface serve plain http (Docker treats them as insecure by default).
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_TAG_PAGES = 50
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


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
        try:
            digest = manifest_digest(page.body, page.headers.get("Docker-Content-Digest", ""), page.truncated)
            if image.is_digest and digest != image.reference:
                raise ValueError(f"the registry answered a manifest whose digest is {digest}, not the pinned one")
        except ValueError as exc:
            return [
                PreflightResult(
                    pins,
                    False,
                    f"base_image {pinned}: {exc} ({url})",
                    "check the registry (a proxy that rewrites manifests?), or pin another source",
                    url,
                )
            ]
        result = _check_image_platform(pinned, where, page, docker_arch(machine))
        if not result.ok:
            return [result]
        return [replace(result, message=f"{result.message}, {digest}", resolved=((pins[0], digest),))]
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


def manifest_digest(body: bytes, header: str = "", truncated: bool = False) -> str:
    """The digest of a manifest as the registry served it: sha256 of its bytes (what `docker pull
    NAME@DIGEST` fetches and checks). For an image index (a multi-platform image) that is the index's
    digest; Docker picks the platform from it as it does from a tag. The registry's Docker-Content-Digest
    header, when it sends one, must agree. ValueError when it cannot be known or the two disagree."""
    header = header.strip()
    if truncated:
        raise ValueError("the manifest is too large to compute its digest")
    computed = "sha256:" + hashlib.sha256(body).hexdigest()
    if header.startswith("sha256:") and header != computed:
        raise ValueError(
            f"the registry's Docker-Content-Digest {header} is not the sha256 of the manifest it sent ({computed})"
        )
    return computed


def pinned_by_digest(base_image: str, digest: str) -> str:
    """'ubuntu:24.04' + 'sha256:ab..' -> 'ubuntu:24.04@sha256:ab..' (Docker pulls by the digest; the
    tag stays for people to read). A pin that names a digest already, or no digest, is left as is."""
    base_image = base_image.strip()
    if not digest or "@" in base_image:
        return base_image
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return f"{base_image}@{digest}"


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
