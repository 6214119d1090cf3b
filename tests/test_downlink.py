"""The compact downlink: the master goes down as a difference from a reference both sides rebuild.

Federated runs use the real ServerApp round loop and the real ClientApp (egress guard and
audit log included) exchanging real Flower messages through the in-process Grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fed_helpers import write_sim
from flwr.app import Message

from ark_core.fed.audit import read_audit, tensors_sha256
from ark_core.fed.federation import FederationConfig, run_fingerprint
from ark_core.fed.transfer import (
    MANIFEST_KEY,
    SCALES_KEY,
    TransferConfig,
    encode_master,
    rebuild_master,
)
from client.app import app as client_app
from client.state import ReferenceStore
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid

INT8_BOTH_WAYS = {"dtype": "int8", "delta": True, "error_feedback": True, "downlink": "int8"}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"backbone.w": torch.randn(37, 11, generator=g),
            "heads.a.weight": torch.randn(2, 11, generator=g), "proj.b": torch.zeros(5)}


@pytest.mark.parametrize("dtype,tol", [("int8", 1 / 254), ("bf16", 2**-8)])
def test_site_rebuilds_bit_for_bit_what_the_server_keeps(dtype, tol):
    reference = _tensors(0)
    master = {k: v + 0.1 * _tensors(1)[k] for k, v in reference.items()}
    payload, kept = encode_master(master, reference, dtype)
    rebuilt = rebuild_master(reference, payload.arrays, payload.manifest, payload.scales,
                             f"{dtype}-delta")
    assert tensors_sha256(rebuilt) == tensors_sha256(kept)
    for k in master:  # int8: half a step of max|d| / 127; bf16: 8 significant bits
        bound = tol * (master[k] - reference[k]).abs().max() + 1e-6
        assert (rebuilt[k] - master[k]).abs().max() <= bound
    assert rebuilt["proj.b"].equal(master["proj.b"])  # an unchanged tensor comes back exact
    assert (list(payload.scales) == [SCALES_KEY]) == (dtype == "int8")


@pytest.mark.parametrize("case,reason", [
    ("other-tensors", r"hold different tensors \(differ at \['proj.b'\]\)"),
    ("other-encoding", "declares encoding 'bf16-delta', this run's transfer is int8-delta"),
    ("other-shape", r"backbone.w: payload shape \[11, 37\], expected \[37, 11\]"),
    ("no-scales", r"scales record keys \[\], expected \['int8'\]"),
])
def test_site_refuses_a_difference_it_cannot_rebuild(case, reason):
    reference = _tensors(0)
    payload, _ = encode_master(_tensors(1), reference, "int8")
    arrays, manifest, scales = dict(payload.arrays), dict(payload.manifest), payload.scales
    if case == "other-tensors":
        del arrays["proj.b"]
    elif case == "other-encoding":
        manifest[MANIFEST_KEY] = "bf16-delta"
    elif case == "other-shape":
        arrays["backbone.w"] = np.ascontiguousarray(arrays["backbone.w"].T)
    elif case == "no-scales":
        scales = None
    with pytest.raises(ValueError, match=reason):
        rebuild_master(reference, arrays, manifest, scales, "int8-delta")


def test_default_downlink_leaves_the_run_fingerprint_unchanged(tmp_path):
    def fp(transfer):
        rc = write_sim(tmp_path, transfer=transfer)
        return run_fingerprint(federation_from_run_config(rc)[0])

    assert fp({"dtype": "bf16"}) == fp({"dtype": "bf16", "downlink": "fp32"})
    assert fp({"dtype": "bf16"}) != fp({"dtype": "bf16", "downlink": "int8"})
    with pytest.raises(ValueError, match="downlink"):
        TransferConfig(downlink="int4")


class RecordingGrid(InProcessGrid):
    """The in-process Grid, keeping what each train message carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train: list[tuple[int, int, dict | None, int]] = []  # round, node, manifest, bytes

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train":
                c = m.content
                enc = c.config_records.get("encoding")
                nbytes = sum(len(a.data) for r in c.array_records.values() for a in r.values())
                self.train.append((int(m.metadata.group_id), m.metadata.dst_node_id,
                                   dict(enc) if enc is not None else None, nbytes))
        return super().push_messages(messages)


def _federate(tmp_path, on_reply=None, **fed) -> tuple[FederationConfig, ArkFederation, RecordingGrid]:
    rc = write_sim(tmp_path, evaluate_every=0, transfer=INT8_BOTH_WAYS, **fed)
    cfg, run_dir = federation_from_run_config(rc)
    grid = RecordingGrid(client_app, 2, rc, on_reply=on_reply)
    federation = ArkFederation(cfg, run_dir, poll_interval=0.0)
    federation.start(grid)
    assert json.loads((run_dir / "state.json").read_text())["finished"]
    return cfg, federation, grid


def test_master_goes_down_in_int8_and_both_sides_hold_the_same_reference(tmp_path):
    cfg, federation, grid = _federate(tmp_path, rounds=3)
    run_dir = federation.run.path
    first = {n: b for r, n, enc, b in grid.train if r == 1}
    assert all(enc is None for r, _, enc, _ in grid.train if r == 1)  # nothing to differ from
    later = [(r, n, enc, b) for r, n, enc, b in grid.train if r > 1]
    assert len(later) == 4
    for _, node, enc, nbytes in later:
        assert enc["arrays"] == "int8-delta" and set(enc) == {"arrays", "reference", "master"}
        assert 0.24 <= nbytes / first[node] <= 0.26  # a quarter, scales included
    masters = {(r["round"], tuple(r["tasks"])): r["sha256"]
               for r in read_audit(run_dir / "audit.jsonl")
               if r["event"] == "master" and r["kind"] == "train"}
    for site, tasks in (("hosp-a", ("nih", "ped")), ("hosp-b", ("ped",))):
        seen = {r["round"]: r["master_sha256"]
                for r in read_audit(run_dir / "sites" / site / "audit.jsonl")
                if r["kind"] == "train"}
        # What the site rebuilt is what the server says it sent, round by round.
        assert seen == {r: masters[(r, tasks)] for r in (1, 2, 3)}
        store = ReferenceStore(run_dir / "sites" / site, run_fingerprint(cfg))
        assert store.rounds() == [2, 3]
        kept = {k: v for k, v in federation.downlink.reference.items()
                if not k.startswith("heads.") or k.split(".")[1] in tasks}
        assert tensors_sha256(store.load(3)) == tensors_sha256(kept) == masters[(3, tasks)]


def test_a_site_that_lost_its_reference_fails_once_then_gets_fp32(tmp_path):
    errors: list[str] = []
    sites = tmp_path / "run" / "sites"

    def on_reply(reply: Message) -> None:
        meta = reply.metadata
        if reply.has_error():
            errors.append(reply.error.reason)
        elif meta.message_type == "train" and meta.group_id == "2" and meta.src_node_id == 1:
            for p in sites.glob("hosp-a/*/reference_round_*"):  # the state dir is wiped
                p.unlink()

    _, _, grid = _federate(tmp_path, on_reply=on_reply, rounds=3, retries=1, min_sites=2)
    assert len(errors) == 1 and "does not hold" in errors[0], errors
    to_a = [(r, enc is not None) for r, n, enc, _ in grid.train if n == 1]
    # Round 3 is tried twice: the difference fails at hosp-a, the retry sends it fp32.
    assert to_a == [(1, False), (2, True), (3, True), (3, False)]
    to_b = [(r, enc is not None) for r, n, enc, _ in grid.train if n == 2]
    assert to_b == [(1, False), (2, True), (3, True), (3, True)]
