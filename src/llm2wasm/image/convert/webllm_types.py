"""Field names of WebLLM's own TypeScript interfaces (lib/config.d.ts of @mlc-ai/web-llm), so the
app config llm2wasm writes can be checked against the WebLLM version the image ships."""

from __future__ import annotations

import re


def interface_fields(declarations: str, name: str) -> set[str]:
    """The member names of `export interface NAME [extends ...] { ... }` (comments ignored)."""
    text = re.sub(r"/\*.*?\*/", "", declarations, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    match = re.search(rf"export interface {re.escape(name)}\b[^{{]*\{{", text)
    if match is None:
        raise ValueError(f"interface {name} not found")
    depth, pos = 1, match.end()
    body_start = pos
    while depth:
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        pos += 1
    body = text[body_start : pos - 1]
    fields, depth = set(), 0
    for line in body.splitlines():
        if depth == 0:
            member = re.match(r"\s*(?:readonly\s+)?(\w+)\??\s*:", line)
            if member:
                fields.add(member.group(1))
        depth += line.count("{") - line.count("}")
    return fields
