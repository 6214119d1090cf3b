"""Update sketches: cosines of the sites' shared-weight differences, without the updates."""

import math

import pytest
import torch

from ark_core.fed.sketch import UpdateSketch


def _master() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"backbone.w": torch.randn(200, 50, generator=g),
            "projector.b": torch.randn(300, generator=g),
            "heads.a.weight": torch.randn(2, 50, generator=g)}


def _cos(a: dict, b: dict) -> float:
    x = torch.cat([a[k].flatten() for k in sorted(a) if not k.startswith("heads.")])
    y = torch.cat([b[k].flatten() for k in sorted(b) if not k.startswith("heads.")])
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("mix", [1.0, 0.5, 0.0, -0.7, -1.0])
def test_sketched_cosines_estimate_the_true_ones(mix):
    master = _master()
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(v.shape, generator=g) for k, v in master.items()}
    noise = {k: torch.randn(v.shape, generator=g) for k, v in master.items()}
    other = {k: mix * base[k] + math.sqrt(max(0.0, 1 - mix**2)) * noise[k] for k in master}
    other["heads.a.weight"] = -base["heads.a.weight"] * 100  # heads never count
    sketch = UpdateSketch(master, dim=4096, seed=3)
    sketch.add("s1", {k: master[k] + base[k] for k in master})
    sketch.add("s2", {k: master[k] + other[k] for k in master})
    got = sketch.cosines()["s1~s2"]
    assert got == pytest.approx(_cos(base, other), abs=0.05)  # ~3 standard errors at 4096


def test_a_site_whose_shared_parts_did_not_move_has_no_cosine():
    master = _master()
    sketch = UpdateSketch(master)
    sketch.add("still", {k: v.clone() for k, v in master.items()})
    sketch.add("moved", {k: v + 1 for k, v in master.items()})
    sketch.add("also", {k: v - 1 for k, v in master.items()})
    assert sketch.cosines() == {"also~moved": pytest.approx(-1.0)}
