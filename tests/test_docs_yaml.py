"""Every YAML example in the docs loads as written, and the compose demo is the demo.

A full example (it has a ``deployment:`` section) must load as the config it is: a site
YAML or a federation YAML. A one-line fragment (``privacy: {...}``) must be accepted on top
of a minimal federation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ark_core.config import load_config
from ark_core.fed.federation import FederationConfig, SiteConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MINIMAL = {"model": {"preset": "tiny"}, "rounds": 1,
           "catalogue": [{"name": "nih", "labels": ["Pneumonia"], "task_type": "binary"}]}


def _blocks() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"```yaml\n(.*?)```", text, re.S):
            out.append((f"{doc.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_the_docs_have_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("where,block", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_yaml_example_loads(where, block, tmp_path):
    data = yaml.safe_load(block)
    if "deployment" in data:  # a whole config file
        kind = SiteConfig if "server" in data["deployment"] else FederationConfig
        path = tmp_path / "example.yaml"
        path.write_text(block, encoding="utf-8")
        load_config(path, kind)
        return
    for line in block.splitlines():  # fragments, one per line (they may repeat a key)
        if line.strip() and not line.lstrip().startswith("#"):
            FederationConfig.model_validate({**MINIMAL, **yaml.safe_load(line)})


def test_compose_demo_trains_as_the_demo():
    demo = yaml.safe_load((ROOT / "simulations" / "demo.yaml").read_text())
    fed = yaml.safe_load((ROOT / "deploy" / "compose" / "federation.yaml").read_text())
    for key in ("model", "catalogue", "rounds", "local_epochs", "min_sites", "train"):
        assert fed.get(key) == demo.get(key), key
    for site in demo["sites"]:
        compose = yaml.safe_load((ROOT / "deploy" / "compose" / f"{site['name']}.yaml").read_text())
        for ours, theirs in zip(compose["tasks"], site["tasks"], strict=True):
            for key in ("name", "dataset", "split", "partition"):
                assert ours.get(key) == theirs.get(key), (site["name"], key)
            assert ours.get("labels") == theirs.get("labels")
