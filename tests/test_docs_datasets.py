"""docs/datasets.md describes every registered reader, with the label lists the code yields.

Each reader has one section whose heading carries ``dataset: <name>``; a line
``Labels: `A`, `B`, ...`` (or ``Labels (`option: value`): ...`` where an option picks the
label set) must equal the reader's labels for those options, and every value of an option
that changes the labels must have its line.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from ark_core.data import ADAPTERS, get_adapter

DOC = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"
HEADING = re.compile(r"^(#+) ")
TAG = re.compile(r"`dataset: ([A-Za-z0-9_]+)`")
LABELS = re.compile(r"^\s*Labels(?: \(`([A-Za-z_]+): ([^`]+)`\))?: (`.*)$")
ITEM = re.compile(r"`([^`]*)`")


def _sections() -> dict[str, list[str]]:
    """Reader name -> the lines of its section (up to the next heading of its level or above)."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    out: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        head = HEADING.match(line)
        tag = TAG.search(line) if head else None
        if not tag:
            continue
        assert tag.group(1) not in out, f"two sections name dataset {tag.group(1)!r}"
        level, body = len(head.group(1)), []
        for nxt in lines[i + 1:]:
            h = HEADING.match(nxt)
            if h and len(h.group(1)) <= level:
                break
            body.append(nxt)
        out[tag.group(1)] = body
    return out


SECTIONS = _sections()


def _value(text: str) -> object:
    return int(text) if text.lstrip("-").isdigit() else text


def _documented(name: str) -> list[tuple[dict, tuple[str, ...]]]:
    """``(options, labels)`` for each Labels line of a reader's section."""
    found = []
    for line in SECTIONS.get(name, []):
        m = LABELS.match(line)
        if m:
            options = {m.group(1): _value(m.group(2))} if m.group(1) else {}
            found.append((options, tuple(ITEM.findall(m.group(3)))))
    return found


def _label_choices(cls) -> dict[str, list]:
    """Options with a fixed set of values that change the default labels: name -> values."""
    out = {}
    for field, info in cls.Options.model_fields.items():
        if typing.get_origin(info.annotation) is not typing.Literal:
            continue
        values = list(typing.get_args(info.annotation))
        labels = {cls.default_labels(cls.parse_options({field: v})) for v in values}
        if len(labels) > 1:
            out[field] = values
    return out


def _has_fixed_labels(cls) -> bool:
    if cls.fixed_labels:
        return True
    try:
        cls.default_labels(cls.parse_options({}))
    except Exception:  # noqa: BLE001 - a reader whose labels are options (csv) has no defaults
        return False
    return True


def test_every_reader_has_a_section():
    assert sorted(SECTIONS) == sorted(ADAPTERS), (
        f"sections {sorted(SECTIONS)} vs registered readers {sorted(ADAPTERS)}"
    )


@pytest.mark.parametrize("name", sorted(n for n, c in ADAPTERS.items() if _has_fixed_labels(c)))
def test_documented_labels_are_the_readers(name):
    cls = get_adapter(name)
    documented = _documented(name)
    assert documented, f"docs/datasets.md: no 'Labels: ...' line in the {name!r} section"
    for options, labels in documented:
        # A reader with fixed labels may require options (chestdr's patient opt-out).
        expected = cls.fixed_labels or tuple(cls.default_labels(cls.parse_options(options)))
        assert labels == expected, f"{name} {options}: the doc lists {labels}, the code {expected}"
    for field, values in _label_choices(cls).items():
        covered = [o[field] for o, _ in documented if field in o]
        assert sorted(map(str, covered)) == sorted(map(str, values)), (
            f"{name}: '{field}' picks the labels; the doc has lines for {covered}, not {values}"
        )


def test_the_parser_sees_a_wrong_label():
    line = "Labels: `Normal`, `Lung Opacity`"
    m = LABELS.match(line)
    assert m and tuple(ITEM.findall(m.group(3))) != get_adapter("rsna_pneumonia").fixed_labels
