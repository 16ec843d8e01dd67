#!/usr/bin/env bash
# What the f16 checks (tests/webgpu_node: WebLLM in Node on Dawn's WebGPU) need on Debian bookworm:
#   - Mesa 25's lavapipe (mesa-vulkan-drivers from bookworm-backports): Dawn refuses bookworm's Mesa 22.3
#     ("shaderUniform*ArrayDynamicIndexing required"), and only lavapipe offers shader-f16 here;
#   - the Vulkan loader (libvulkan1), which dawn.node loads;
#   - Node and npm, when missing (Debian's: run.mjs needs Node 18.19 or newer);
#   - `npm ci` in this folder (the pinned webgpu and @mlc-ai/web-llm, checked against package-lock.json).
# Idempotent: each step runs only when its result is missing (a second run takes about a second: the
# probe); apt steps need root. Says what it did. .ci/setup.sh runs it.
# A probe at the end names the adapter; if it fails, so do the f16 tests, with its reason (this exits 0
# all the same, so that the rest of a machine's setup goes on).
set -euo pipefail
cd "$(dirname "$0")"

say() { echo "webgpu_node setup: $*" >&2; }

mesa_major() {
  local version
  version=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
  echo "${version%%.*}"
}

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    say "$1 needs root: run this script as root" && exit 1
  fi
}

APT_UPDATED=0
apt_update() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
}

# The Debian mirror this machine already uses (as .ci/install-docker.sh finds it), for the backports line.
debian_mirror() {
  local mirror
  mirror=$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -e security -e '^$' | head -n1 || true)
  if [[ -z "$mirror" ]]; then
    mirror=$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | grep -v security |
      sed -E 's/^deb (\[[^]]*\] )?//' | awk '{print $1}' | head -n1 || true)
  fi
  echo "${mirror:-http://deb.debian.org/debian}"
}

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
major=$(mesa_major)
vulkan=$(dpkg-query -W -f='${Status}' libvulkan1 2>/dev/null || true)
if [[ -z "$major" || "$major" -lt 25 || "$vulkan" != *"ok installed"* ]]; then
  need_root "installing Mesa 25's lavapipe"
  target=()
  if [[ "$codename" == bookworm ]]; then
    # apt reads *.list and *.sources only; a commented-out line does not count
    if ! grep -qs -E '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources; then
      keyring=/usr/share/keyrings/debian-archive-keyring.gpg
      signed=""
      [[ -f $keyring ]] && signed="[signed-by=$keyring] "
      echo "deb ${signed}$(debian_mirror) bookworm-backports main" >/etc/apt/sources.list.d/bookworm-backports.list
      say "added bookworm-backports to /etc/apt/sources.list.d/bookworm-backports.list"
    fi
    target=(-t bookworm-backports)
  fi
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" mesa-vulkan-drivers libvulkan1 >/dev/null
  say "installed mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) and libvulkan1"
  if [[ $(mesa_major) -lt 25 ]]; then
    say "mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) is older than 25: Dawn will refuse it"
  fi
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  need_root "installing Node and npm"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  say "installed nodejs $(node --version) and npm $(npm --version)"
fi

# npm ci removes and reinstalls node_modules: only when what is there is not what the lock names.
if [[ ! node_modules/.package-lock.json -nt package-lock.json ]] || ! npm ls --all >/dev/null 2>&1; then
  # --ignore-scripts: webgpu's only install script clears a macOS quarantine attribute
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
  say "npm ci: installed $(npm ls --depth=0 --parseable 2>/dev/null | tail -n +2 | sed 's|.*/node_modules/||' | tr '\n' ' ')"
fi

if probe=$(node probe.mjs 2>/dev/null); then
  say "ready: $(node -e 'const r = JSON.parse(process.argv[1]); console.log(`${r.adapter.description}, shader-f16`)' "$probe")"
else
  say "warning: the Dawn probe failed, the f16 tests will fail: $probe"
fi
