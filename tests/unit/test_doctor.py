from llm2wasm.host.doctor import Finding, report


def test_report_names_the_fix_only_for_problems():
    text, healthy = report(
        [
            Finding(True, "docker CLI: /usr/bin/docker", "unused"),
            Finding(False, "BuildKit (buildx): missing", "install docker-buildx"),
        ]
    )
    assert not healthy
    assert "ok  docker CLI: /usr/bin/docker" in text and "unused" not in text
    assert "NO  BuildKit (buildx): missing\n     fix: install docker-buildx" in text
