"""The hermetic local mirror: everything the `hermetic` profile builds from, on 127.0.0.1.

* a Debian base image made with debootstrap and `docker import` (no registry is reachable);
* a wheelhouse of the real Python packages (torch CPU, transformers, peft, bitsandbytes, the real
  apache-tvm wheel) plus the stand-in mlc_llm wheel, downloaded by the host's pip and served over
  HTTP (pip inside containers cannot verify TLS here);
* git repositories of the stand-ins for emsdk, mlc-llm and its TVM submodule, served by
  `git daemon`.

Everything is cached under $LLM2WASM_HERMETIC_CACHE (default ~/.cache/llm2wasm-hermetic).
Usage: python tests/hermetic/mirror.py up | down | status
"""

from __future__ import annotations

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STANDINS = ROOT / "tests" / "standins"
sys.path.insert(0, str(ROOT / "src"))

from llm2wasm.docker import image_id  # noqa: E402 (needs the sys.path line above)
from llm2wasm.pins import resolve_profile  # noqa: E402 (needs the sys.path line above)

WHEELHOUSE_PORT = 38471
GIT_PORT = 38472
BASE_IMAGE = "llm2wasm-hermetic/debian:bookworm"
DEBIAN_SUITE = "bookworm"
# Git stand-ins: repository name -> (source folder, tag)
GIT_REPOS = {"emsdk": ("emsdk", "3.1.56"), "tvm-source": ("tvm-source", None), "mlc-llm": ("mlc-llm", "v0.20.0")}
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


# ---------------------------------------------------------------- wheelhouse
def wheelhouse_requirements() -> list[str]:
    pins = resolve_profile("hermetic")
    return [
        pins["torch_requirement"],
        pins["transformers_requirement"],
        pins["peft_requirement"],
        pins["bitsandbytes_requirement"],
        pins["mlc_ai_requirement"],
        # build backend for `pip install` of llm2wasm itself in the app layer
        "setuptools>=77",
    ]


def standin_wheel_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((STANDINS / "mlc_llm_package").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
            digest.update(str(path.relative_to(STANDINS)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_wheelhouse() -> Path:
    wheelhouse = cache_dir() / "wheelhouse"
    wheelhouse.mkdir(exist_ok=True)
    stamp = wheelhouse / ".llm2wasm-stamp.json"
    wanted = {"requirements": wheelhouse_requirements(), "standin": standin_wheel_digest()}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return wheelhouse
    log("downloading the wheelhouse (torch CPU, transformers, peft, bitsandbytes, apache-tvm)")
    # The host's own Python and platform are the containers' (Debian bookworm: CPython 3.11, x86_64).
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            str(wheelhouse),
            "--only-binary=:all:",
            *wanted["requirements"],
        ]
    )
    for old in wheelhouse.glob("mlc_llm_standin-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as build:
        shutil.copytree(STANDINS / "mlc_llm_package", Path(build) / "pkg")
        # A local version label from the stand-in's content: a changed stand-in gets a new file name,
        # so neither pip's HTTP cache nor a stale wheelhouse can hand out the old one.
        pyproject = Path(build) / "pkg" / "pyproject.toml"
        text = pyproject.read_text()
        pyproject.write_text(
            text.replace('version = "0.20.0.dev0"', f'version = "0.20.0.dev0+standin.{wanted["standin"][:8]}"')
        )
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                str(wheelhouse),
                str(Path(build) / "pkg"),
            ]
        )
    stamp.write_text(json.dumps(wanted))
    return wheelhouse


# ---------------------------------------------------------------- git stand-ins
def git(*args: str, cwd: Path) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_DATE=FIXED_DATE,
        GIT_COMMITTER_DATE=FIXED_DATE,
        GIT_AUTHOR_NAME="llm2wasm stand-in",
        GIT_AUTHOR_EMAIL="standin@llm2wasm.invalid",
        GIT_COMMITTER_NAME="llm2wasm stand-in",
        GIT_COMMITTER_EMAIL="standin@llm2wasm.invalid",
    )
    return subprocess.run(
        ["git", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def standin_requirement() -> str:
    """The exact stand-in mlc_llm requirement. Docker caches `pip install` by its command line, not
    by what the wheelhouse holds, so the tests pass this as a pin: a changed stand-in rebuilds ml."""
    wheel = next((cache_dir() / "wheelhouse").glob("mlc_llm_standin-*.whl"))
    return "mlc-llm-standin==" + wheel.name.split("-")[1]


def ensure_git_repos() -> Path:
    """(Re)create the bare repositories from tests/standins; cheap, so always fresh."""
    base = cache_dir() / "git"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir()
    with tempfile.TemporaryDirectory(prefix="llm2wasm-git-") as tmp:
        for name in ("emsdk", "tvm-source", "mlc-llm"):
            folder, tag = GIT_REPOS[name]
            work = Path(tmp) / name
            shutil.copytree(STANDINS / folder, work, ignore=shutil.ignore_patterns("__pycache__"))
            git("init", "--quiet", cwd=work)
            if name == "mlc-llm":
                # A relative URL resolves against the superproject's remote: git://HOST:PORT/tvm-source.
                git("submodule", "add", "--quiet", str(base / "tvm-source.git"), "3rdparty/tvm", cwd=work)
                git("config", "-f", ".gitmodules", "submodule.3rdparty/tvm.url", "../tvm-source", cwd=work)
            git("add", "-A", cwd=work)
            git("commit", "--quiet", "-m", f"stand-in for {name}", cwd=work)
            if tag:
                git("tag", "-a", tag, "-m", f"stand-in tag {tag}", cwd=work)
            git("clone", "--quiet", "--bare", str(work), str(base / f"{name}.git"), cwd=Path(tmp))
    return base


# ---------------------------------------------------------------- servers
def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_file() -> Path:
    return cache_dir() / "servers.json"


def serving() -> bool:
    if not (port_open(WHEELHOUSE_PORT) and port_open(GIT_PORT)):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{WHEELHOUSE_PORT}/", timeout=5) as response:
            return b"torch-" in response.read()
    except OSError:
        return False


def start_servers(wheelhouse: Path, git_base: Path) -> list[int]:
    for port in (WHEELHOUSE_PORT, GIT_PORT):
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
    pids = [http.pid, daemon.pid]
    pid_file().write_text(json.dumps(pids))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if serving():
            return pids
        time.sleep(0.2)
    stop_servers()
    raise RuntimeError(f"mirror servers did not start; see {logs}/http.log and git-daemon.log")


def stop_servers() -> None:
    if not pid_file().exists():
        return
    for pid in json.loads(pid_file().read_text()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    pid_file().unlink()


def up() -> bool:
    """Make sure everything is ready and served. True when this call started the servers."""
    ensure_base_image()
    wheelhouse = ensure_wheelhouse()
    git_base = ensure_git_repos()
    if serving():
        return False
    start_servers(wheelhouse, git_base)
    log(f"serving wheelhouse on 127.0.0.1:{WHEELHOUSE_PORT} and git on 127.0.0.1:{GIT_PORT}")
    return True


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
