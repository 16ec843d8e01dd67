"""`invoke doctor`: what this host has for building and running the image, each with the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llm2wasm.host.findings import report_lines
from llm2wasm.host.pins import Profile

MIN_FREE_GB = 25


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def check_host(path: Path = Path(".")) -> list[Finding]:
    findings = []
    docker = shutil.which("docker")
    findings.append(
        Finding(
            bool(docker),
            f"docker CLI: {docker or 'not found'}",
            "install Docker (Debian: `bash .ci/install-docker.sh` as root)",
        )
    )
    if not docker:
        return findings
    info = _run(["docker", "info", "--format", "{{json .}}"])
    engine = info.returncode == 0
    findings.append(
        Finding(
            engine,
            "Docker engine reachable" if engine else "Docker engine not reachable",
            "start dockerd, or check DOCKER_HOST and your membership of the docker group",
        )
    )
    buildx = _run(["docker", "buildx", "version"])
    findings.append(
        Finding(
            buildx.returncode == 0,
            f"BuildKit (buildx): {buildx.stdout.strip() or 'missing'}",
            "install the buildx plugin (Debian: docker-buildx; `bash .ci/install-docker.sh`)",
        )
    )
    if engine:
        runtimes = json.loads(info.stdout).get("Runtimes") or {}
        gpu = "nvidia" in runtimes
        findings.append(
            Finding(
                True,
                "NVIDIA container runtime: "
                + (
                    "yes, conversions use the GPU"
                    if gpu
                    else "no; conversions run on the CPU (install the NVIDIA Container Toolkit for CUDA)"
                ),
            )
        )
    free_gb = shutil.disk_usage(path).free / 2**30
    findings.append(
        Finding(
            free_gb >= MIN_FREE_GB,
            f"free disk: {free_gb:.0f} GB",
            f"the CUDA image and its build cache need about {MIN_FREE_GB} GB",
        )
    )
    return findings


def report(findings: list[Finding]) -> tuple[str, bool]:
    return report_lines((finding.ok, finding.what, finding.fix) for finding in findings)


def doctor_command(root: Path, profile: Profile | None = None) -> int:
    """`invoke doctor`: the host's report, and with a profile its preflight; 2 when a pin does not
    resolve, 1 when the host has a problem, else 0."""
    text, healthy = report(check_host(root))
    print(text)
    if profile is not None:
        from llm2wasm.host.preflight import format_results, run_preflight

        print(f"pins of profile {profile.name}:")
        pins_text, pins_resolve = format_results(run_preflight(profile))
        print(pins_text)
        if not pins_resolve:
            return 2
    return 0 if healthy else 1
