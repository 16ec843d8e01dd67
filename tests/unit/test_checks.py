import pytest

from llm2wasm.host.checks import (
    BASE_DIGEST_LABEL,
    BASE_NAME_LABEL,
    bad_path_entries,
    base_image_label_problems,
    commit_label_check,
    emcc_version,
    env_dict,
    env_garbage,
    expected_os,
    parse_built_from,
    requirement_pin,
    tag_commit,
    tvm_commit_check,
    unexpected_web_runtime_files,
    version_matches,
)


def test_env_dict():
    assert env_dict(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}


def test_seed_path_bug_is_flagged():
    # what `ENV PATH = /root/tools/emsdk-main:/usr/bin` leaves behind
    assert bad_path_entries("= /root/tools/emsdk-main:/usr/bin") == ["= /root/tools/emsdk-main"]
    assert env_garbage({"PATH": "= /a:/b"}) == ["PATH"]


@pytest.mark.parametrize("value,bad", [("/a:/b", []), ("/a::/b", [""]), ("/a:rel", ["rel"]), ("/a:", [""])])
def test_bad_path_entries(value, bad):
    assert bad_path_entries(value) == bad


def test_emcc_version():
    line = (
        "emcc (Emscripten gcc/clang-like replacement + linker emulating GNU ld) 3.1.56 "
        "(cf90417346b78455089e64eb909d71d091ecc055)"
    )
    assert emcc_version(line) == "3.1.56"
    assert emcc_version("clang version 19") is None


@pytest.mark.parametrize(
    "req,expected",
    [
        ("mlc-ai-cu128==0.20.0", ("mlc-ai-cu128", "0.20.0")),
        ("mlc-llm-nightly-cu128", ("mlc-llm-nightly-cu128", None)),
        ("torch==2.13.0+cpu", ("torch", "2.13.0+cpu")),
        ("Apache_TVM>=0.25", ("apache-tvm", None)),
    ],
)
def test_requirement_pin(req, expected):
    assert requirement_pin(req) == expected


def test_version_matches():
    assert version_matches("2.13.0+cpu", "2.13.0")
    assert version_matches("2.13.0+cpu", "2.13.0+cpu")
    assert not version_matches("2.13.0", "2.13.0+cpu")
    assert not version_matches("0.1", "0.20.0")


def test_tvm_commit_check():
    assert (
        tvm_commit_check("b628d91fac716679db539884a55f8c6651f54dea", "b628d91fac716679db539884a55f8c6651f54dea").status
        == "match"
    )
    mismatch = tvm_commit_check("b628d91fac716679db539884a55f8c6651f54dea", "0123456789abcdef0123456789abcdef01234567")
    assert mismatch.status == "mismatch" and "b628d91" in mismatch.message and "mlc_llm_ref" in mismatch.message
    assert tvm_commit_check("NOT-FOUND", "b628d91").status == "unknown"
    assert tvm_commit_check(None, "b628d91").status == "unknown"


def test_expected_os():
    assert expected_os("ubuntu:24.04") == ("ubuntu", "24.04")
    assert expected_os("llm2wasm-hermetic/debian:bookworm") == ("debian", "bookworm")
    assert expected_os("ubuntu:24.04@sha256:abc") == ("ubuntu", "24.04")
    assert expected_os("localhost:5000/ubuntu") == ("ubuntu", "latest")


def test_tvm_commit_from_the_version_when_libinfo_is_gone():
    head = "c7b458e946bc4266915da582457476bdcd9705ae"
    # a release: its tag in the web runtime's TVM repository names the commit
    assert tvm_commit_check(None, head, "0.26.0", head).status == "match"
    tagged_elsewhere = tvm_commit_check(None, head, "0.20.0", "b628d91fac716679db539884a55f8c6651f54dea")
    assert tagged_elsewhere.status == "mismatch" and "its tag v0.20.0" in tagged_elsewhere.message
    # a nightly: the local version names it
    assert tvm_commit_check(None, head, "0.26.dev12+gc7b458e9", None).status == "match"
    assert tvm_commit_check(None, head, "0.26.dev12+g0123abcd", None).status == "mismatch"
    # nothing says: not a pass
    unknown = tvm_commit_check(None, head, "0.20.0", None)
    assert unknown.status == "unknown" and "no tag v0.20.0" in unknown.message


BUILT_FROM_RECORD = """MLC_LLM_REPO=https://github.com/mlc-ai/mlc-llm.git
MLC_LLM_REF=v0.20.0
MLC_LLM_CHECKED_OUT=v0.20.0
MLC_LLM_COMMIT=1111111111111111111111111111111111111111
MLC_LLM_PINS_TVM=b628d91fac716679db539884a55f8c6651f54dea
TVM_COMMIT=b628d91fac716679db539884a55f8c6651f54dea
TVM_TAGS=v0.19.0=2222222222222222222222222222222222222222 v0.20.0=3333333333333333333333333333333333333333
"""


def test_built_from_record_and_its_tags():
    record = parse_built_from(BUILT_FROM_RECORD)
    assert record["MLC_LLM_CHECKED_OUT"] == "v0.20.0" and record["TVM_COMMIT"] == record["MLC_LLM_PINS_TVM"]
    assert tag_commit(record, "v0.20.0") == "3" * 40
    assert tag_commit(record, "v0.26.0") is None and tag_commit({}, "v0.20.0") is None


def test_only_runtime_outputs_count_as_kept():
    listing = [
        "BUILT_FROM",
        "web/dist/wasm/mlc_wasm_runtime.bc",
        "3rdparty/tvm/web/dist/wasm/wasm_runtime.o",
        "3rdparty/tvm/src/runtime/module.cc",
        ".git/HEAD",
        "3rdparty/tvm/web/emcc/wasm_runtime.cc",
    ]
    assert unexpected_web_runtime_files(listing) == [
        ".git/HEAD",
        "3rdparty/tvm/src/runtime/module.cc",
        "3rdparty/tvm/web/emcc/wasm_runtime.cc",
    ]


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    "label,built,status",
    [
        (COMMIT, COMMIT, "match"),
        (COMMIT, "f" * 40, "mismatch"),  # the label and what was built disagree
        (COMMIT, "", "mismatch"),  # nothing recorded in BUILT_FROM
        (COMMIT[:12], COMMIT, "mismatch"),  # an abbreviation is not a record
        ("", COMMIT, "unrecorded"),  # --no-preflight
        (None, COMMIT, "unrecorded"),  # an image without the label
    ],
)
def test_commit_label_check(label, built, status):
    check = commit_label_check(label, built, "mlc-llm")
    assert check.status == status, check.message
    if status == "mismatch" and built:
        assert "mlc-llm" in check.message


def test_base_image_labels():
    digest = "sha256:" + "a" * 64
    labels = {BASE_NAME_LABEL: "ubuntu:24.04", BASE_DIGEST_LABEL: digest}
    assert base_image_label_problems(labels, "ubuntu:24.04") == []
    assert base_image_label_problems({**labels, BASE_DIGEST_LABEL: ""}, "ubuntu:24.04") == []  # by tag
    assert base_image_label_problems(labels, "ubuntu:22.04") == [
        f"{BASE_NAME_LABEL} is 'ubuntu:24.04', not the pin base_image='ubuntu:22.04'"
    ]
    assert base_image_label_problems({}, "ubuntu:24.04") == [
        f"{BASE_NAME_LABEL} is None, not the pin base_image='ubuntu:24.04'"
    ]
    assert base_image_label_problems({**labels, BASE_DIGEST_LABEL: "latest"}, "ubuntu:24.04") == [
        f"{BASE_DIGEST_LABEL} 'latest' is not a sha256 digest"
    ]
    other = "sha256:" + "b" * 64
    pinned = f"ubuntu@{other}"
    assert base_image_label_problems({BASE_NAME_LABEL: pinned, BASE_DIGEST_LABEL: digest}, pinned) == [
        f"{BASE_DIGEST_LABEL} is {digest!r}, but the pin names {other}"
    ]
