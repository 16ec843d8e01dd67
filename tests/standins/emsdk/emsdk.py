"""STAND-IN for emscripten-core/emsdk's emsdk.py: not the real SDK manager.

Follows the interface llm2wasm drives (shared/INTERFACES.md, "emsdk"; upstream emsdk.py):
`install [-jN] [--shallow] VERSION`, `activate VERSION`, `construct_env`, `list`. It installs
stand-in tools from sdk/ into the layout the real emsdk uses instead of downloading an SDK.
"""

import os
import shutil
import stat
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
# SDK version -> the node version the emsdk checkout at tag 3.1.56 bundles.
KNOWN_SDKS = {"3.1.56": "16.20.0"}
ALIASES = {"latest": "3.1.56"}


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def resolve(version):
    version = ALIASES.get(version, version)
    if version.startswith("sdk-"):
        version = version[4:].split("-")[0]
    if version not in KNOWN_SDKS:
        fail(f"tool or SDK not found: '{version}'")
    return version


def node_dir(version):
    return os.path.join(ROOT, "node", f"{KNOWN_SDKS[version]}_64bit")


def copy_tool(name, dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, "sdk", name), dest)
    os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(args):
    positional = [a for a in args if not a.startswith("-")]
    if len(positional) != 1:
        fail("install takes one tool or SDK name")
    version = resolve(positional[0])
    print(f"Installing SDK 'sdk-releases-{version}-64bit' (stand-in)..", file=sys.stderr)
    emscripten = os.path.join(ROOT, "upstream", "emscripten")
    copy_tool("emcc", os.path.join(emscripten, "emcc"))
    copy_tool("clang", os.path.join(ROOT, "upstream", "bin", "clang"))
    with open(os.path.join(emscripten, "emscripten-version.txt"), "w") as handle:
        handle.write(f'"{version}"\n')
    node_bin = os.path.join(node_dir(version), "bin")
    copy_tool("node", os.path.join(node_bin, "node"))
    copy_tool("npm", os.path.join(node_bin, "npm"))
    with open(os.path.join(node_bin, ".node-version"), "w") as handle:
        handle.write(KNOWN_SDKS[version] + "\n")
    os.makedirs(os.path.join(ROOT, "downloads"), exist_ok=True)
    with open(os.path.join(ROOT, "downloads", f"standin-sdk-{version}.txt"), "w") as handle:
        handle.write("stand-in download marker\n")
    with open(os.path.join(ROOT, ".installed"), "w") as handle:
        handle.write(version + "\n")
    print("Done installing SDK (stand-in).", file=sys.stderr)


def installed_version():
    try:
        with open(os.path.join(ROOT, ".installed")) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


def activate(args):
    positional = [a for a in args if not a.startswith("-")]
    if len(positional) != 1:
        fail("activate takes one tool or SDK name")
    version = resolve(positional[0])
    if installed_version() != version:
        fail(f"SDK '{version}' is not installed: run `emsdk install {version}` first")
    with open(os.path.join(ROOT, ".emscripten"), "w") as handle:
        handle.write(f"NODE_JS = '{node_dir(version)}/bin/node'\n")
        handle.write(f"LLVM_ROOT = '{ROOT}/upstream/bin'\n")
        handle.write(f"BINARYEN_ROOT = '{ROOT}/upstream'\n")
        handle.write(f"EMSCRIPTEN_ROOT = '{ROOT}/upstream/emscripten'\n")
    print(f"The Emscripten configuration file {ROOT}/.emscripten has been rewritten.", file=sys.stderr)


def construct_env():
    version = installed_version()
    if version is None or not os.path.isfile(os.path.join(ROOT, ".emscripten")):
        print("No tools/SDKs activated.", file=sys.stderr)
        return
    path = os.environ.get("PATH", "").split(os.pathsep)
    node_bin = os.path.join(node_dir(version), "bin")
    additions = [ROOT]
    if shutil.which("node") is None:
        additions.append(node_bin)
    additions.append(os.path.join(ROOT, "upstream", "emscripten"))
    new_path = additions + [p for p in path if p not in additions]
    print("Setting up EMSDK environment (stand-in)", file=sys.stderr)
    print(f'export PATH="{os.pathsep.join(new_path)}";')
    print(f'export EMSDK="{ROOT}";')
    print(f'export EMSDK_NODE="{node_bin}/node";')


def main(argv):
    if not argv:
        fail("missing command: install, activate, construct_env or list")
    command, args = argv[0], argv[1:]
    if command == "install":
        install(args)
    elif command == "activate":
        activate(args)
    elif command == "construct_env":
        construct_env()
    elif command == "list":
        for version in KNOWN_SDKS:
            mark = "INSTALLED" if installed_version() == version else ""
            print(f"         {version}    {mark}")
    else:
        fail(f"unknown command '{command}'")


if __name__ == "__main__":
    main(sys.argv[1:])
