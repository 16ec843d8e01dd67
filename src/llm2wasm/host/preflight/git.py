"""Preflight of ``emsdk_ref`` (only when ``emscripten_source`` is "emsdk") and ``mlc_llm_ref``: a tag or branch of
the repository, via ``git ls-remote``."""

from __future__ import annotations

import os
import re
import subprocess

from llm2wasm.host.pins import Profile
from llm2wasm.host.preflight.fetching import Fetcher, PreflightResult, SourceFailed, nearest_names

GIT_TIMEOUT = 20.0
COMMIT_ID = re.compile(r"[0-9a-fA-F]{7,40}")


# --- git -------------------------------------------------------------------------------------------


def _git_refs(fetcher: Fetcher, git: str, repo: str, timeout: float) -> dict[str, str]:
    """Ref name -> commit for every tag and branch of repo; one `git ls-remote` per repository per run."""

    def list_refs() -> dict[str, str]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")  # never wait for a password or host key
        try:
            completed = subprocess.run(
                [git, "ls-remote", "--tags", "--heads", repo],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise SourceFailed.unreachable(repo, f"no answer in {timeout:g} s") from None
        except OSError as exc:
            raise SourceFailed(repo, f"cannot run {git} ls-remote: {exc.strerror or exc}") from None
        if completed.returncode != 0:
            lines = [line.strip().removeprefix("fatal: ") for line in completed.stderr.splitlines() if line.strip()]
            reason = " ".join(lines)[:200] or f"git ls-remote exited with {completed.returncode}"
            raise SourceFailed.unreachable(repo, reason)
        refs = {}
        for line in completed.stdout.splitlines():
            commit, _, name = line.partition("\t")
            refs[name.strip()] = commit.strip()
        return refs

    return fetcher.once(("git", git, repo), list_refs)


def ref_commit(refs: dict[str, str], name: str) -> str:
    """The commit a ref of `git ls-remote` names: for an annotated tag, the commit its peeled entry
    (``NAME^{}``) names, not the tag object (what `git rev-parse HEAD` of a clone at it says)."""
    return refs.get(name + "^{}") or refs.get(name) or ""


def check_git_ref(
    fetcher: Fetcher, profile: Profile, repo_pin: str, ref_pin: str, git: str, timeout: float
) -> list[PreflightResult]:
    pins = (repo_pin, ref_pin)
    repo, ref = str(profile.get(repo_pin) or ""), str(profile.get(ref_pin) or "")
    refs = _git_refs(fetcher, git, repo, timeout)
    for kind, prefix in (("branch", "refs/heads/"), ("tag", "refs/tags/")):
        commit = ref_commit(refs, prefix + ref)
        if commit:
            return [
                PreflightResult(
                    pins,
                    True,
                    f"{ref_pin} {ref}: {kind} in {repo} ({commit[:12]})",
                    source=repo,
                    resolved=((ref_pin, commit),),
                )
            ]
    if COMMIT_ID.fullmatch(ref):
        # The layers clone with `git clone --depth 1 --branch REF`, which takes tags and branches only.
        tagged = sorted(
            name.removeprefix("refs/tags/").removesuffix("^{}")
            for name, commit in refs.items()
            if commit.startswith(ref.lower()) and name.startswith("refs/tags/")
        )
        fix = f"pin the tag instead: --set {ref_pin}={tagged[0]}" if tagged else "pin a tag or branch at that commit"
        message = f"{ref_pin} {ref}: a commit id, but the build clones a tag or branch (git clone --branch)"
        return [PreflightResult(pins, False, message, fix, repo)]
    names = {name.removeprefix("refs/tags/").removeprefix("refs/heads/").removesuffix("^{}") for name in refs}
    nearest = nearest_names(ref, names)
    hint = f"nearest: {', '.join(nearest)}" if nearest else f"{len(names)} tags and branches exist, none similar"
    fix = f"pin an existing tag or branch: --set {ref_pin}={nearest[0]}" if nearest else ""
    return [PreflightResult(pins, False, f"{ref_pin} {ref}: no such tag or branch in {repo}; {hint}", fix, repo)]
