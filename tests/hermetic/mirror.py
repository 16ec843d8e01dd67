"""The hermetic local mirror: everything the `hermetic` profile builds from, on 127.0.0.1.

* a Debian base image made with debootstrap and `docker import`, served by the mirror's own image
  registry (Debian's docker-registry; no public registry is reachable);
* a wheelhouse of the real Python packages (torch CPU, transformers, peft, bitsandbytes, the real
  apache-tvm 0.26.0 wheel and what mlc_llm imports), downloaded by the host's pip, plus two wheels
  made here: the real mlc_llm Python package from the patched mlc-llm checkout, and the import
  adapter it needs without its compiled library (mlc_adapter/); served over HTTP (pip inside
  containers cannot verify TLS here) as a flat page (--find-links) and a PEP 503 index (/simple/),
  beside the pinned @mlc-ai/web-llm tarball and its package document at the npm registry's paths;
* git repositories served by `git daemon`: the real mlc-llm (79d603f0, plus one compatibility
  commit, tagged), apache/tvm v0.26.0, apache/tvm-ffi and emsdk at tag 3.1.56, made from the
  upstream archives in shared/upstream (sha256-checked) with their submodule links pointing at each
  other;
* the two archives `emsdk install 3.1.56` downloads (the SDK's wasm-binaries and node 16.20.0),
  which cannot be had here: stand-ins (tests/standins/emsdk-downloads) packed under the names and
  in the layout of the real ones, served with a SHA256SUMS file for the emsdk layer's
  `emsdk_downloads_url` pin.

Everything is cached under $LLM2WASM_HERMETIC_CACHE (default ~/.cache/llm2wasm-hermetic).
Usage: python tests/hermetic/mirror.py up | down | status
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import parse_wheel_filename

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STANDINS = ROOT / "tests" / "standins"
sys.path.insert(0, str(ROOT / "src"))

from llm2wasm.host.docker import image_id  # noqa: E402 (needs the sys.path line above)
from llm2wasm.host.locks import lock_path  # noqa: E402 (needs the sys.path line above)
from llm2wasm.host.pins import PROJECT_ROOT, resolve_profile  # noqa: E402 (needs the sys.path line above)

WHEELHOUSE_PORT = 38471
GIT_PORT = 38472
REGISTRY_PORT = 38474
# The base image lives in the mirror's own registry (Debian's docker-registry), so the build and the
# preflight reach it the way they reach ubuntu:24.04 on Docker Hub.
BASE_IMAGE = f"127.0.0.1:{REGISTRY_PORT}/llm2wasm-hermetic/debian:bookworm"
DEBIAN_SUITE = "bookworm"
# Git stand-ins: repository name -> (source folder, tag)
FIXED_DATE = "2025-01-01T00:00:00+00:00"


def log(message: str) -> None:
    print(f"[hermetic-mirror] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    path = Path(os.environ.get("LLM2WASM_HERMETIC_CACHE", Path.home() / ".cache" / "llm2wasm-hermetic"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kwargs)


# ---------------------------------------------------------------- base image
def debian_mirror() -> str:
    """The Debian mirror this host's apt is configured with (never typed into the project)."""
    candidates = []
    for path in Path("/etc/apt/sources.list.d").glob("*.sources"):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "deb":
                candidates += [p for p in parts[1:] if "://" in p]
    for uri in candidates:
        if "security" not in uri:
            return uri
    raise RuntimeError("no Debian mirror configured in /etc/apt sources")


APT_CLEANUP = "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"
APT_DOCKER_CLEAN = (
    f'DPkg::Post-Invoke {{ "{APT_CLEANUP}"; }};\n'
    f'APT::Update::Post-Invoke {{ "{APT_CLEANUP}"; }};\n'
    'Dir::Cache::pkgcache "";\n'
    'Dir::Cache::srcpkgcache "";\n'
)


def ensure_base_image() -> str:
    if image_id(BASE_IMAGE) is not None:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed: run .ci/install-docker.sh (or apt-get install debootstrap)")
    mirror = debian_mirror()
    log(f"debootstrap {DEBIAN_SUITE} (minbase) -> {BASE_IMAGE}; takes about a minute")
    with tempfile.TemporaryDirectory(prefix="llm2wasm-debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), mirror], stdout=subprocess.DEVNULL)
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / sub).glob("*"):
                if entry.is_file():
                    entry.unlink()
        # What the official Debian and Ubuntu images configure (and users' base images have): apt
        # keeps neither the downloaded packages nor its binary caches after an install
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_DOCKER_CLEAN)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(
            [
                "docker",
                "import",
                "-c",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-c",
                'CMD ["bash"]',
                "-c",
                "LABEL io.llm2wasm.hermetic=debootstrap-" + DEBIAN_SUITE,
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
        )
        tar.wait()
    return BASE_IMAGE


def registry_has_base_image() -> bool:
    name, _, tag = BASE_IMAGE.split("/", 1)[1].rpartition(":")
    request = urllib.request.Request(
        f"http://127.0.0.1:{REGISTRY_PORT}/v2/{name}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def ensure_base_image_pushed() -> None:
    ensure_base_image()
    if not registry_has_base_image():
        log(f"pushing {BASE_IMAGE} to the mirror's registry")
        run(["docker", "push", BASE_IMAGE], stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- upstream sources
@dataclass(frozen=True)
class UpstreamArchive:
    """One `git archive` of an upstream commit, as listed in shared/upstream/README.md."""

    repo: str  # the name the git daemon serves it under
    github: str
    commit: str
    file: str
    sha256: str
    # The folder every path in the archive starts with ("" when none), left out when unpacking.
    top_folder: str = ""


UPSTREAM = {
    "mlc-llm": UpstreamArchive(
        "mlc-llm",
        "mlc-ai/mlc-llm",
        "79d603f085f50500e9509fa01785ffa7ecfaaa93",
        "mlc-llm-79d603f0.tar.xz",
        "18f982f3af696f888b6b80ada1d3971bd18c640b205cbbf78587bc5b777b45c1",
    ),
    "tvm": UpstreamArchive(
        "tvm",
        "apache/tvm",
        "c7b458e946bc4266915da582457476bdcd9705ae",
        "tvm-v0.26.0-c7b458e9.tar.xz",
        "bde55e95b33c87dbfe0fd9d0128dd2b1b304ba4e0490c361d7bcba998fe89b7a",
    ),
    "tvm-ffi": UpstreamArchive(
        "tvm-ffi",
        "apache/tvm-ffi",
        "12dbf053b3d9ba4ebd9da3123b1aeca79cf74229",
        "tvm-ffi-12dbf053.tar.xz",
        "650be55490702560af5afc07abb08f553c1f67688f0f52f36ab3f4c1f174515b",
    ),
    "emsdk": UpstreamArchive(
        "emsdk",
        "emscripten-core/emsdk",
        "e10826f9196bb0e704014af2252ef58fb4ba261b",
        "emsdk-3.1.56.tar.xz",
        "57dcad68fdd4871766399114ec6f348a8c6f5a49747506f0c7b926cf460883c0",
        top_folder="emsdk-3.1.56",
    ),
}
EMSDK_TAG = "3.1.56"
# The compatibility commit on top of mlc-llm, and the tag the hermetic profile pins (mlc_llm_ref).
COMPAT_PATCH = HERE / "mlc-llm-tvm-0.26-compat.patch"
MLC_LLM_TAG = "79d603f0-tvm-0.26-compat"


def upstream_dir() -> Path:
    """shared/upstream beside the checkout (CI lays shared/ there); LLM2WASM_UPSTREAM_DIR overrides."""
    return Path(os.environ.get("LLM2WASM_UPSTREAM_DIR", ROOT.parent / "shared" / "upstream"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def archive_from_github(archive: UpstreamArchive, target: Path) -> None:
    """For a machine with internet and no shared/upstream: the same commit, archived the same way.
    Only with LLM2WASM_UPSTREAM_FROM_GITHUB=1: the test machines cannot reach GitHub."""
    log(f"fetching {archive.github}@{archive.commit[:8]} from GitHub")
    with tempfile.TemporaryDirectory() as tmp:
        run(["git", "init", "--quiet", tmp])
        run(
            [
                "git",
                "-C",
                tmp,
                "fetch",
                "--quiet",
                "--depth",
                "1",
                f"https://github.com/{archive.github}",
                archive.commit,
            ]
        )
        with open(target, "wb") as out:
            git_archive = subprocess.Popen(["git", "-C", tmp, "archive", archive.commit], stdout=subprocess.PIPE)
            run(["xz", "-T0", "-c"], stdin=git_archive.stdout, stdout=out)
            if git_archive.wait() != 0:
                raise RuntimeError(f"git archive of {archive.github}@{archive.commit} failed")


def checked_archive(archive: UpstreamArchive) -> Path:
    """The archive file, its sha256 checked; a clear error when it is missing or altered."""
    path = upstream_dir() / archive.file
    if not path.exists() and os.environ.get("LLM2WASM_UPSTREAM_FROM_GITHUB") == "1":
        path = cache_dir() / "upstream" / archive.file
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            archive_from_github(archive, path)
    if not path.exists():
        raise RuntimeError(
            f"upstream archive {archive.file} ({archive.github}@{archive.commit[:8]}) not found in {upstream_dir()}: "
            "the hermetic mirror serves the real upstream sources from shared/upstream beside the checkout. "
            "Set LLM2WASM_UPSTREAM_DIR to the folder that holds it, or LLM2WASM_UPSTREAM_FROM_GITHUB=1 "
            "on a machine with internet to archive the same commit from GitHub."
        )
    actual = sha256_of(path)
    if actual != archive.sha256:
        raise RuntimeError(
            f"upstream archive {path} has sha256 {actual}, expected {archive.sha256} "
            f"({archive.github}@{archive.commit[:8]}): replace it with the listed file"
        )
    return path


# ---------------------------------------------------------------- wheels
def write_wheel(dest: Path, name: str, version: str, files: dict[str, bytes], requires: list[str]) -> Path:
    """A pure-Python wheel from a mapping of archive path -> content (PEP 427), with no build backend:
    the adapter's .pth file must sit at the top of site-packages, which setuptools does not do."""
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    members = dict(files)
    members[f"{dist}.dist-info/METADATA"] = metadata.encode()
    members[f"{dist}.dist-info/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: llm2wasm-hermetic-mirror\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record_lines = []
    for member, content in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record_lines.append(f"{member},sha256={digest},{len(content)}")
    record_lines.append(f"{dist}.dist-info/RECORD,,")
    members[f"{dist}.dist-info/RECORD"] = ("\n".join(record_lines) + "\n").encode()
    path = dest / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member in sorted(members):
            info = zipfile.ZipInfo(member, date_time=(2025, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            wheel.writestr(info, members[member], zipfile.ZIP_DEFLATED)
    return path


def folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {
        f"{prefix}/{path.relative_to(folder).as_posix()}": path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def content_digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for member in sorted(files):
        digest.update(member.encode() + b"\0" + files[member])
    return digest.hexdigest()[:10]


# What the real mlc_llm package imports on the gen_config / convert_weight / compile path, from
# mlc-llm's python/requirements.txt less what that path never imports (datasets, flashinfer,
# pandas, tiktoken, uvicorn: the serving and benchmark code); psutil is imported but unlisted upstream.
MLC_LLM_RUNTIME_REQUIREMENTS = [
    "apache-tvm-ffi",
    "fastapi",
    "ml_dtypes>=0.5.1",
    "openai",
    "prompt_toolkit",
    "psutil",
    "requests",
    "safetensors",
    "shortuuid",
    "torch",
    "tqdm",
    "transformers",
]
ADAPTER_NAME = "llm2wasm-hermetic-mlc-adapter"


def adapter_files() -> dict[str, bytes]:
    folder = HERE / "mlc_adapter"
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix in {".py", ".pth"}}


def build_local_wheels(wheelhouse: Path, mlc_llm_python: Path) -> None:
    """The hermetic mlc_llm wheel (the patched checkout's python/mlc_llm, pure Python: no libmlc_llm)
    and the import adapter it needs without that library."""
    for old in [*wheelhouse.glob("mlc_llm-*.whl"), *wheelhouse.glob("llm2wasm_hermetic_mlc_adapter-*.whl")]:
        old.unlink()
    adapter = adapter_files()
    adapter_version = f"1.0+{content_digest(adapter)}"
    write_wheel(wheelhouse, ADAPTER_NAME, adapter_version, adapter, [])
    package = folder_files(mlc_llm_python / "mlc_llm", "mlc_llm")
    version = f"0.1.dev0+g{UPSTREAM['mlc-llm'].commit[:8]}.{content_digest(package)}"
    write_wheel(
        wheelhouse,
        "mlc-llm",
        version,
        package,
        [*MLC_LLM_RUNTIME_REQUIREMENTS, f"{ADAPTER_NAME}=={adapter_version}"],
    )


def wheelhouse_requirements() -> list[str]:
    pins = resolve_profile("hermetic")
    return [
        pins["torch_requirement"],
        pins["transformers_requirement"],
        pins["peft_requirement"],
        pins["bitsandbytes_requirement"],
        pins["mlc_ai_requirement"],
        pins["tvm_ffi_requirement"],
        pins["wgsl_validator_requirement"],
        *MLC_LLM_RUNTIME_REQUIREMENTS,
        # build backend for `pip install` of llm2wasm itself in the app layer
        "setuptools>=77",
    ]


def ensure_wheelhouse(mlc_llm_python: Path) -> Path:
    wheelhouse = cache_dir() / "wheelhouse"
    wheelhouse.mkdir(exist_ok=True)
    stamp = wheelhouse / ".llm2wasm-stamp.json"
    lock = lock_path(PROJECT_ROOT, resolve_profile("hermetic").pins)
    wanted = {"requirements": wheelhouse_requirements(), "lock": hashlib.sha256(lock.read_bytes()).hexdigest()}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        log("downloading the wheelhouse (torch CPU, transformers, peft, bitsandbytes, apache-tvm, mlc_llm's needs)")
        # The host's own Python and platform are the containers' (Debian bookworm: CPython 3.11, x86_64).
        download = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
        download += ["--dest", str(wheelhouse)]
        # the ml layer's lock first, checked file by file as the layer's own install checks it
        run([*download, "--require-hashes", "-r", str(lock)])
        run([*download, *wanted["requirements"]])
        stamp.write_text(json.dumps(wanted))
    build_local_wheels(wheelhouse, mlc_llm_python)
    ensure_webllm(wheelhouse)
    ensure_emsdk_downloads(wheelhouse)
    write_simple_index(wheelhouse)
    return wheelhouse


def write_simple_index(wheelhouse: Path) -> None:
    """The wheelhouse also as a PEP 503 index at /simple/ (what --index-url reads), beside the flat
    page at / (what --find-links reads): the preflight is tested against both forms."""
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name = parse_wheel_filename(wheel.name)[0]
        projects.setdefault(name, []).append(wheel.name)
    simple = wheelhouse / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    for name, files in projects.items():
        links = "".join(f'<a href="../../{file}">{file}</a><br>\n' for file in files)
        (simple / name).mkdir(parents=True)
        (simple / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    root = "".join(f'<a href="{name}/">{name}</a><br>\n' for name in sorted(projects))
    (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{root}</body></html>\n")


def ensure_webllm(wheelhouse: Path) -> Path:
    """The pinned @mlc-ai/web-llm tarball, packed from the npm registry by the host's npm and served
    at the registry's own path (NPM_REGISTRY/@mlc-ai/web-llm/-/web-llm-VERSION.tgz)."""
    version = resolve_profile("hermetic")["webllm_version"]
    target = wheelhouse / "npm" / "@mlc-ai" / "web-llm" / "-" / f"web-llm-{version}.tgz"
    if not target.exists():
        if shutil.which("npm") is None:
            raise RuntimeError("npm is not installed: the mirror packs @mlc-ai/web-llm with it (apt-get install npm)")
        log(f"packing @mlc-ai/web-llm@{version} from the npm registry")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            run(
                ["npm", "pack", "--silent", f"@mlc-ai/web-llm@{version}", "--pack-destination", tmp],
                stdout=subprocess.DEVNULL,
            )
            shutil.move(str(next(Path(tmp).glob("*.tgz"))), target)
    # The package document the registry serves at NPM_REGISTRY/@mlc-ai/web-llm (index.html of that
    # folder, so the plain file server answers the registry's path).
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(target.read_bytes()).digest()).decode()
    packument = {
        "name": "@mlc-ai/web-llm",
        "dist-tags": {"latest": version},
        "versions": {version: {"name": "@mlc-ai/web-llm", "version": version, "dist": {"integrity": integrity}}},
    }
    (target.parent.parent / "index.html").write_text(json.dumps(packument))
    return target


def emsdk_download_names() -> tuple[str, str]:
    """The file names `emsdk install EMSDK_TAG` stores its two downloads under, read from the real
    emsdk checkout: `<release hash>-wasm-binaries.tar.xz` (emscripten-releases-tags.json, the
    manifest's download_prefix) and the linux-x64 node archive its SDK uses (emsdk_manifest.json)."""
    with tempfile.TemporaryDirectory(prefix="llm2wasm-emsdk-") as tmp:
        unpack_upstream(UPSTREAM["emsdk"], Path(tmp), "emscripten-releases-tags.json", "emsdk_manifest.json")
        release = json.loads((Path(tmp) / "emscripten-releases-tags.json").read_text())["releases"][EMSDK_TAG]
        manifest = json.loads((Path(tmp) / "emsdk_manifest.json").read_text())
    sdk = next(s for s in manifest["sdks"] if s["version"] == "releases-%releases-tag%" and s.get("bitness") == 64)
    node_name = next(u for u in sdk["uses"] if u.startswith("node-"))
    node = next(
        t
        for t in manifest["tools"]
        if f"{t['id']}-{t['version']}-{t['bitness']}bit" == node_name and t.get("arch", "x86_64") == "x86_64"
    )
    return f"{release}-wasm-binaries.tar.xz", node["linux_url"]


def ensure_emsdk_downloads(wheelhouse: Path) -> Path:
    """STAND-INS for the two archives emsdk's installer downloads from Google's storage (unreachable
    here), laid out as the real ones: the SDK's `install/` tree (bin/clang, emscripten/emcc with
    emscripten-version.txt and node_modules) and node's `node-vX-linux-x64/bin`. Their tools are the
    scripts in tests/standins/emsdk-downloads. Served with a SHA256SUMS file, the form the emsdk
    layer's `emsdk_downloads_url` pin reads; the real emsdk script installs and activates them."""
    target = wheelhouse / "emsdk-downloads"
    tools = STANDINS / "emsdk-downloads"
    wanted = content_digest(folder_files(tools, "emsdk-downloads")) + UPSTREAM["emsdk"].sha256
    stamp = target / ".llm2wasm-stamp"
    if stamp.exists() and stamp.read_text() == wanted:
        return target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    sdk_name, node_name = emsdk_download_names()
    node_folder = node_name.removesuffix(".tar.xz")
    node_version = node_folder.split("-")[1].removeprefix("v")
    layouts = {
        sdk_name: {
            "install/bin/clang": "clang",
            "install/emscripten/emcc": "emcc",
            "install/emscripten/emscripten-version.txt": f'"{EMSDK_TAG}"\n',
            "install/emscripten/node_modules/.package-lock.json": "{}\n",
        },
        node_name: {
            f"{node_folder}/bin/node": "node",
            f"{node_folder}/bin/npm": "npm",
            f"{node_folder}/bin/.node-version": node_version + "\n",
        },
    }
    sums = []
    with tempfile.TemporaryDirectory(prefix="llm2wasm-emsdk-downloads-") as tmp:
        for archive, files in layouts.items():
            tree = Path(tmp) / archive
            for inside, source in files.items():
                path = tree / inside
                path.parent.mkdir(parents=True, exist_ok=True)
                if (tools / source).is_file():
                    shutil.copyfile(tools / source, path)
                    path.chmod(0o755)
                else:
                    path.write_text(source)
            top = next(iter(files)).split("/")[0]
            run(["tar", "-C", str(tree), "--owner=0", "--group=0", "-cJf", str(target / archive), top])
            sums.append(f"{sha256_of(target / archive)}  {archive}\n")
    (target / "SHA256SUMS").write_text("".join(sums))
    stamp.write_text(wanted)
    log(f"emsdk download stand-ins: {', '.join(layouts)}")
    return target


def mlc_llm_requirement() -> str:
    """The exact hermetic mlc_llm requirement. Docker caches `pip install` by its command line, not
    by what the wheelhouse holds, so the tests pass this as a pin: a changed patch rebuilds ml."""
    wheel = next((cache_dir() / "wheelhouse").glob("mlc_llm-*.whl"))
    return "mlc-llm==" + wheel.name.split("-")[1]


def tvm_ffi_dlpack_header(wheelhouse: Path) -> bytes:
    """dlpack.h as the apache-tvm-ffi wheel ships it: tvm-ffi's own 3rdparty/dlpack submodule
    (dmlc/dlpack) is not among the archives, and the web runtime needs only this header."""
    wheel = next(wheelhouse.glob("apache_tvm_ffi-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        return archive.read("tvm_ffi/3rdparty/dlpack/include/dlpack/dlpack.h")


# ---------------------------------------------------------------- git repositories
def git(*args: str, cwd: Path) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_DATE=FIXED_DATE,
        GIT_COMMITTER_DATE=FIXED_DATE,
        GIT_AUTHOR_NAME="llm2wasm hermetic mirror",
        GIT_AUTHOR_EMAIL="mirror@llm2wasm.invalid",
        GIT_COMMITTER_NAME="llm2wasm hermetic mirror",
        GIT_COMMITTER_EMAIL="mirror@llm2wasm.invalid",
    )
    return subprocess.run(
        [
            "git",
            "-c",
            "protocol.file.allow=always",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "core.autocrlf=false",
            *args,
        ],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def add_gitlink(work: Path, path: str, commit: str, url: str) -> None:
    """Point submodule `path` at `commit` of the mirror's own repository `url` (relative: resolved
    against the superproject's remote, git://127.0.0.1:PORT/NAME). Upstream's .gitmodules entry
    for the path keeps its name; only its url changes."""
    folder = work / path
    if folder.exists():
        shutil.rmtree(folder)  # git archive leaves an empty folder where a submodule was
    git("update-index", "--add", "--cacheinfo", f"160000,{commit},{path}", cwd=work)
    section = f"submodule.{path}"
    modules = work / ".gitmodules"
    if modules.exists():
        listing = subprocess.run(
            ["git", "config", "-f", str(modules), "--get-regexp", r"^submodule\..*\.path$"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        for line in listing:
            key, _, value = line.partition(" ")
            if value == path:
                section = key[: -len(".path")]
    git("config", "-f", ".gitmodules", f"{section}.path", path, cwd=work)
    git("config", "-f", ".gitmodules", f"{section}.url", url, cwd=work)


def unpack_upstream(archive: UpstreamArchive, target: Path, *members: str) -> None:
    strip = ["--strip-components=1"] if archive.top_folder else []
    names = [f"{archive.top_folder}/{m}" if archive.top_folder else m for m in members]
    run(["tar", "-C", str(target), *strip, "-xJf", str(checked_archive(archive)), *names])


def upstream_repo(tmp: Path, archive: UpstreamArchive, submodules: dict[str, tuple[str, str]]) -> str:
    """A bare repository `base/NAME.git` whose main is the archive's tree, with `submodules`
    (path -> (mirror repository, commit)) as gitlinks. Returns its commit."""
    work = tmp / archive.repo
    work.mkdir()
    unpack_upstream(archive, work)
    git("init", "--quiet", cwd=work)
    git("add", "-A", "-f", cwd=work)
    for path, (repo, commit) in submodules.items():
        add_gitlink(work, path, commit, f"../{repo}")
    if submodules:
        git("add", ".gitmodules", cwd=work)
    git(
        "commit",
        "--quiet",
        "-m",
        f"{archive.github} {archive.commit[:8]} (git archive), submodules from the llm2wasm hermetic mirror\n\n"
        f"Upstream-Commit: {archive.commit}",
        cwd=work,
    )
    return git("rev-parse", "HEAD", cwd=work)


def publish_bare(work: Path, base: Path, name: str) -> None:
    git("clone", "--quiet", "--bare", str(work), str(base / f"{name}.git"), cwd=work.parent)


def ensure_git_repos(wheelhouse: Path) -> Path:
    """The repositories the hermetic build clones: the real mlc-llm, apache/tvm and apache/tvm-ffi
    (with the compatibility commit and tag on mlc-llm), dlpack's header, and the real emsdk at its
    tag. Rebuilt when an input changed."""
    base = cache_dir() / "git"
    stamp_path = cache_dir() / "git.stamp.json"
    stamp = {
        "archives": {name: a.sha256 for name, a in UPSTREAM.items()},
        "patch": hashlib.sha256(COMPAT_PATCH.read_bytes()).hexdigest(),
        "layout": 4,
    }
    if base.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return base
    for archive in UPSTREAM.values():
        checked_archive(archive)  # fail before any work when one is missing
    if base.exists():
        shutil.rmtree(base)
    base.mkdir()
    log("building the mirror's git repositories from the upstream archives (mlc-llm, tvm, tvm-ffi)")
    with tempfile.TemporaryDirectory(prefix="llm2wasm-git-") as tmp_name:
        tmp = Path(tmp_name)
        dlpack = tmp / "dlpack"
        (dlpack / "include" / "dlpack").mkdir(parents=True)
        (dlpack / "include" / "dlpack" / "dlpack.h").write_bytes(tvm_ffi_dlpack_header(wheelhouse))
        git("init", "--quiet", cwd=dlpack)
        git("add", "-A", cwd=dlpack)
        git("commit", "--quiet", "-m", "dlpack.h as shipped in the apache-tvm-ffi wheel", cwd=dlpack)
        dlpack_commit = git("rev-parse", "HEAD", cwd=dlpack)
        publish_bare(dlpack, base, "dlpack")

        ffi_commit = upstream_repo(tmp, UPSTREAM["tvm-ffi"], {"3rdparty/dlpack": ("dlpack", dlpack_commit)})
        publish_bare(tmp / "tvm-ffi", base, "tvm-ffi")
        tvm_commit = upstream_repo(tmp, UPSTREAM["tvm"], {"3rdparty/tvm-ffi": ("tvm-ffi", ffi_commit)})
        # upstream's release tag (the web-runtime check finds the apache-tvm 0.26.0 wheel's commit by it)
        git("tag", "-a", "v0.26.0", "-m", "apache/tvm v0.26.0", cwd=tmp / "tvm")
        publish_bare(tmp / "tvm", base, "tvm")
        upstream_repo(tmp, UPSTREAM["mlc-llm"], {"3rdparty/tvm": ("tvm", tvm_commit)})
        mlc = tmp / "mlc-llm"
        # --index: the patch goes straight to the index (an `add -A` would drop the gitlinks,
        # whose folders are empty in this work tree)
        git("apply", "--index", str(COMPAT_PATCH), cwd=mlc)
        git(
            "commit",
            "--quiet",
            "-m",
            "llm2wasm hermetic: mlc-llm on apache-tvm 0.26.0\n\nApplies tests/hermetic/mlc-llm-tvm-0.26-compat.patch.",
            cwd=mlc,
        )
        git("tag", "-a", MLC_LLM_TAG, "-m", "mlc-llm 79d603f0 + compatibility with apache-tvm 0.26.0", cwd=mlc)
        publish_bare(mlc, base, "mlc-llm")

        upstream_repo(tmp, UPSTREAM["emsdk"], {})
        git("tag", "-a", EMSDK_TAG, "-m", f"emsdk {EMSDK_TAG}", cwd=tmp / "emsdk")
        publish_bare(tmp / "emsdk", base, "emsdk")
    stamp_path.write_text(json.dumps(stamp))
    return base


def patched_mlc_llm_python() -> Path:
    """python/ of the tagged mlc-llm commit (what the hermetic mlc_llm wheel is made from)."""
    target = cache_dir() / "mlc-llm-python"
    stamp = cache_dir() / "mlc-llm-python.stamp"
    wanted = UPSTREAM["mlc-llm"].sha256 + hashlib.sha256(COMPAT_PATCH.read_bytes()).hexdigest()
    if target.exists() and stamp.exists() and stamp.read_text() == wanted:
        return target
    if target.exists():
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="llm2wasm-mlc-") as tmp:
        run(["tar", "-C", tmp, "-xJf", str(checked_archive(UPSTREAM["mlc-llm"])), "python"])
        subprocess.run(["git", "apply", str(COMPAT_PATCH)], cwd=tmp, check=True, capture_output=True)
        shutil.copytree(Path(tmp) / "python", target)
    stamp.write_text(wanted)
    return target


# ---------------------------------------------------------------- servers
def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_file() -> Path:
    return cache_dir() / "servers.json"


def serving() -> bool:
    if not (port_open(WHEELHOUSE_PORT) and port_open(GIT_PORT) and port_open(REGISTRY_PORT)):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{WHEELHOUSE_PORT}/", timeout=5) as response:
            return b"torch-" in response.read()
    except OSError:
        return False


def start_servers(wheelhouse: Path, git_base: Path) -> list[int]:
    for port in (WHEELHOUSE_PORT, GIT_PORT, REGISTRY_PORT):
        if port_open(port):
            raise RuntimeError(
                f"port {port} on 127.0.0.1 is taken by something that is not this mirror: "
                "stop it, or run `python tests/hermetic/mirror.py down`"
            )
    logs = cache_dir()
    http = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(WHEELHOUSE_PORT),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(wheelhouse),
        ],
        stdout=open(logs / "http.log", "w"),  # noqa: SIM115 (the server outlives this function)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    daemon = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            f"--base-path={git_base}",
            "--listen=127.0.0.1",
            f"--port={GIT_PORT}",
            str(git_base),
        ],
        stdout=open(logs / "git-daemon.log", "w"),  # noqa: SIM115 (the server outlives this function)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    registry_binary = shutil.which("docker-registry")
    if registry_binary is None:
        raise RuntimeError("docker-registry is not installed: run `bash .ci/install-docker.sh` as root")
    config = logs / "registry.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {logs / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{REGISTRY_PORT}\n"
    )
    registry = subprocess.Popen(
        [registry_binary, "serve", str(config)],
        stdout=open(logs / "registry.log", "w"),  # noqa: SIM115 (the server outlives this function)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pids = [http.pid, daemon.pid, registry.pid]
    pid_file().write_text(json.dumps(pids))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if serving():
            return pids
        time.sleep(0.2)
    stop_servers()
    raise RuntimeError(f"mirror servers did not start; see {logs}/http.log, git-daemon.log and registry.log")


def stop_servers() -> None:
    if not pid_file().exists():
        return
    for pid in json.loads(pid_file().read_text()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    pid_file().unlink()


def up() -> bool:
    """Make sure everything is ready and served. True when this call started the servers."""
    wheelhouse = ensure_wheelhouse(patched_mlc_llm_python())
    git_base = ensure_git_repos(wheelhouse)
    started = not serving()
    if started:
        start_servers(wheelhouse, git_base)
        log(
            f"serving wheelhouse on 127.0.0.1:{WHEELHOUSE_PORT}, git on 127.0.0.1:{GIT_PORT} "
            f"and images on 127.0.0.1:{REGISTRY_PORT}"
        )
    ensure_base_image_pushed()
    return started


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "up":
        up()
    elif command == "down":
        stop_servers()
    elif command == "status":
        print(
            json.dumps(
                {"base_image": image_id(BASE_IMAGE) is not None, "serving": serving(), "cache": str(cache_dir())}
            )
        )
    else:
        print("usage: mirror.py up | down | status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
