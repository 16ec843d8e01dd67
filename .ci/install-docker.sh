#!/usr/bin/env bash
# Install and start what llm2wasm's integration tests need on a fresh Debian host:
# Debian's docker.io (engine + 20.10 CLI), the buildx plugin (so any docker CLI on PATH
# can build with BuildKit), debootstrap (hermetic base image), git, patch, docker-registry,
# chromium (browser test), npm (the mirror packs WebLLM) and gcc (a stand-in CUDA library).
# Idempotent: every step checks first. Needs root.
set -euo pipefail

log() { printf '[install-docker] %s\n' "$*" >&2; }

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
command -v patch >/dev/null 2>&1 || need_pkgs+=(patch)
# a real image registry on 127.0.0.1 for the publish tests
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
# Debian's Chromium for the browser test (WebGPU on the CPU via SwiftShader); Playwright drives it
# with executable_path and never downloads a browser of its own
[[ -x /usr/bin/chromium ]] || need_pkgs+=(chromium)
# npm packs the pinned @mlc-ai/web-llm for the hermetic mirror
command -v npm >/dev/null 2>&1 || need_pkgs+=(npm)
# gcc compiles the stand-ins for a CUDA wheel's library and the NVIDIA driver (tests/standins/cuda-wheel)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
if ((${#need_pkgs[@]})); then
  log "apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# BuildKit through the docker CLI needs the buildx plugin. bookworm has none; trixie's
# docker-buildx .deb needs only libc6 >= 2.34 and installs on bookworm. Reuse the mirror
# this machine is already configured with rather than naming one here.
if ! docker buildx version >/dev/null 2>&1; then
  mirror=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  if [[ -z "$mirror" ]]; then
    mirror=$(grep -h -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
  fi
  [[ -n "$mirror" ]] || { log "no Debian mirror configured in apt sources"; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' "$mirror" > "$tmp/trixie.list"
  apt_opts=(-o "Dir::Etc::SourceList=$tmp/trixie.list" -o "Dir::Etc::SourceParts=-" -o "Dir::State::Lists=$tmp/lists"
            -o "Dir::Cache::Archives=$tmp/archives" -o "APT::Get::List-Cleanup=0")
  log "fetching docker-buildx from trixie"
  apt-get "${apt_opts[@]}" update -qq
  (cd "$tmp" && apt-get "${apt_opts[@]}" download docker-buildx)
  dpkg -i "$tmp"/docker-buildx_*.deb >/dev/null
  # The plugin lands in Debian's plugin dir; a docker CLI installed elsewhere looks in its own.
  for dir in /usr/local/lib/docker/cli-plugins "$HOME/.docker/cli-plugins"; do
    mkdir -p "$dir"
    ln -sf /usr/libexec/docker/cli-plugins/docker-buildx "$dir/docker-buildx"
  done
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  nohup dockerd >/var/log/llm2wasm-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/llm2wasm-dockerd.log"; tail -20 /var/log/llm2wasm-dockerd.log >&2; exit 1; }
fi
log "docker $(docker version --format '{{.Server.Version}}') with buildx $(docker buildx version | awk '{print $2}')"
