"""docs/ stays true to the code: the wire page lists every message with its real fields, and the files the design
pages link exist."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from sage_transport import wire

ROOT = Path(__file__).resolve().parents[1]


def test_the_wire_page_lists_every_message_with_its_tag_and_fields() -> None:
    text = (ROOT / "docs" / "wire.md").read_text()
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+) \|", text, re.M)}
    messages = {name: getattr(wire, name) for name in wire.__all__ if isinstance(getattr(wire, name), type)}
    tagged = {n: c for n, c in messages.items() if issubclass(c, msgspec.Struct) and c.__struct_config__.tag}
    assert set(rows) == set(tagged)
    for name, cls in tagged.items():
        tag, fields = rows[name]
        assert tag == cls.__struct_config__.tag, name
        assert [f.strip() for f in fields.split(",")] == [f.name for f in msgspec.inspect.type_info(cls).fields], name
    assert f"protocol version {wire.PROTOCOL_VERSION}" in text


def test_the_design_pages_link_files_that_exist() -> None:
    for page in ("design.md", "wire.md", "failure-model.md"):
        text = (ROOT / "docs" / page).read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (ROOT / "docs" / target).resolve().exists(), f"{page} links {target}"
