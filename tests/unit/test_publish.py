from llm2wasm.host.publish import ImageFacts, safe_tag, tags_for


def test_tags_come_from_the_image_contents():
    facts = ImageFacts(python="3.12.3", mlc_llm="0.20.0.dev0", emsdk="3.1.56")
    assert tags_for(facts, "stable", "0123456789abcdef0123", "20261125") == [
        "stable",
        "stable-python-3.12",
        "stable-20261125",
        "stable-0123456789ab",
        "stable-mlc-llm-0.20.0.dev0",
        "stable-emsdk-3.1.56",
    ]


def test_unknown_parts_are_left_out_and_tags_are_valid():
    facts = ImageFacts(python="3.11.2", mlc_llm="0.20.0.dev0+standin.abc", emsdk=None)
    tags = tags_for(facts, "hermetic", "unknown", "20261125")
    assert "hermetic-mlc-llm-0.20.0.dev0-standin.abc" in tags
    assert not any("emsdk" in tag or "unknown" in tag for tag in tags)
    assert safe_tag("a+b/c") == "a-b-c"
