"""docs/reliability.md names the test that holds each behaviour: every named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_named_in_the_reliability_map_exists():
    text = (REPO / "docs" / "reliability.md").read_text()
    named = 0
    for cell in re.findall(r"`([^`]*::[^`]*)`|`(test_[a-z0-9_*]+)`", text):
        reference = cell[0] or cell[1]
        if "::" in reference:
            module, name = reference.split("::")
            current = REPO / "tests" / module
        else:
            name = reference  # same file as the previous reference in its cell
        assert current.is_file(), f"{current} named in docs/reliability.md does not exist"
        pattern = re.escape(name).replace(r"\*", r"\w*")
        assert re.search(rf"^def {pattern}\(", current.read_text(), re.M), f"{reference} not found in {current.name}"
        named += 1
    assert named >= 30
