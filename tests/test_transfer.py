"""Compact transfer: encodings, the validator and egress guard on declared encodings, and
federated runs whose replies are fp16, bf16 and int8 with error feedback."""

import json

import numpy as np
import pytest
import torch
from fed_helpers import write_sim
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from test_server_app import _inspect

from ark_core.fed.aggregate import StreamingAggregator, UpdateRejected, float_state, head_task
from ark_core.fed.audit import read_audit
from ark_core.fed.federation import FederationConfig, load_simulation, run_fingerprint
from ark_core.fed.protocol import Instruction
from ark_core.fed.transfer import (
    SCALES_KEY,
    TransferConfig,
    as_update,
    decode_tensor,
    encode_tensor,
    encode_update,
    unpack_scales,
)
from ark_core.model.factory import create_model
from client.app import app as client_app
from client.egress import EGRESS_BLOCKED, egress_guard
from client.site import Site
from client.state import ResidualStore
from ops.arrays import Tensors, payload_nbytes, raw_array, to_tensor
from server.app import federation_from_run_config
from server.loop import ArkFederation
from simulations.inprocess import InProcessGrid, set_server_identity

torch.set_num_threads(1)


def _tensor(seed: int, scale: float = 1.0, shape=(37, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------- round trips
def test_bf16_is_the_exact_bit_pattern_and_round_trips_exactly():
    x = torch.cat([_tensor(0).flatten(), torch.tensor([0.0, -0.0, 1e-40, -3e38, 1.0 + 2**-9])])
    arr, scale = encode_tensor(x, "bf16")
    assert scale is None and arr.dtype == np.uint16
    ref = x.to(torch.bfloat16)
    assert np.array_equal(arr, ref.view(torch.int16).numpy().view(np.uint16))
    for payload in (arr, to_tensor(Array(arr)), to_tensor(raw_array(arr))):  # Arrays viewed in place
        out = decode_tensor(payload, "bf16")
        assert out.dtype == torch.float32
        assert torch.equal(out.view(torch.int32), ref.float().view(torch.int32))  # -0.0 kept


def test_fp16_round_trip():
    x = _tensor(1, 3.0)
    arr, _ = encode_tensor(x, "fp16")
    assert arr.dtype == np.float16
    assert torch.equal(decode_tensor(to_tensor(Array(arr)), "fp16"), x.half().float())


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e3])
def test_int8_error_is_at_most_half_a_step(magnitude):
    x = _tensor(2, magnitude)
    q, scale = encode_tensor(x, "int8")
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == ()
    assert np.abs(q).max() == 127 and q.min() >= -127
    assert float(scale) == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    out = decode_tensor(to_tensor(Array(q)), "int8-delta", to_tensor(Array(scale)),
                        torch.zeros_like(x))
    err = (out - x).abs().max().item()
    assert err <= float(scale) / 2 * (1 + 1e-5)
    assert err > 0  # it is lossy: the bound is not met by sending the values


def test_int8_of_zeros_and_of_non_finite_values():
    q, scale = encode_tensor(torch.zeros(5), "int8")
    assert float(scale) == 0 and not q.any()
    assert torch.equal(decode_tensor(q, "int8-delta", scale, torch.ones(5)), torch.ones(5))
    _, scale = encode_tensor(torch.tensor([1.0, float("nan")]), "int8")
    assert not np.isfinite(scale)  # which the server rejects (see below)


def test_delta_loses_less_than_weights_and_decodes_against_the_master():
    master = {"w": _tensor(3, 1.0)}
    student = {"w": master["w"] + _tensor(4, 1e-3)}
    errors = {}
    for cfg in (TransferConfig(dtype="bf16"), TransferConfig(dtype="bf16", delta=True),
                TransferConfig(dtype="int8", delta=True)):
        p = encode_update(student, master, cfg)
        out = as_update(p.arrays, p.manifest, p.scales, master, cfg.encoding)["w"]
        errors[cfg.encoding] = (out - student["w"]).abs().max().item()
    assert errors["bf16-delta"] < errors["bf16"] / 50
    assert errors["int8-delta"] < errors["bf16"]


def test_error_feedback_keeps_the_sum_of_sent_differences_on_track():
    # One large value sets the scale; the small ones round to zero every round without EF.
    d = torch.tensor([1.0, 0.003, -0.002, 0.0005])
    master = {"w": torch.zeros(4)}
    cfg_ef = TransferConfig(dtype="int8", delta=True, error_feedback=True)
    cfg = TransferConfig(dtype="int8", delta=True)
    sent_ef, sent, residual = torch.zeros(4), torch.zeros(4), None
    rounds = 20
    for _ in range(rounds):
        p = encode_update({"w": d}, master, cfg_ef, residual)
        residual = p.residual
        sent_ef += as_update(p.arrays, p.manifest, p.scales, master, cfg_ef.encoding)["w"]
        p = encode_update({"w": d}, master, cfg)
        assert p.residual is None
        sent += as_update(p.arrays, p.manifest, p.scales, master, cfg.encoding)["w"]
    step = 1.0 / 127
    assert (sent_ef - rounds * d).abs().max() <= step / 2 + 1e-5  # bounded by one residual
    assert (sent - rounds * d).abs().max() >= rounds * 0.002  # grows with the rounds
    torch.testing.assert_close(sent_ef + residual["w"], rounds * d)


def test_config_shorthand_rules_and_fingerprint():
    assert TransferConfig.model_validate("bf16").encoding == "bf16"
    assert TransferConfig(dtype="int8", delta=True).encoding == "int8-delta"
    with pytest.raises(ValueError, match="delta: true"):
        TransferConfig(dtype="int8")
    with pytest.raises(ValueError, match="error_feedback needs"):
        TransferConfig(dtype="fp16", error_feedback=True)
    with pytest.raises(ValueError, match="error_feedback needs"):
        TransferConfig(dtype="fp32", delta=True, error_feedback=True)
    base = {"catalogue": [{"name": "t", "labels": ["a"], "task_type": "binary"}], "rounds": 2}
    fp32 = FederationConfig.model_validate(base)
    same = FederationConfig.model_validate({**base, "transfer": {"dtype": "fp32"}})
    bf16 = FederationConfig.model_validate({**base, "transfer": "bf16"})
    assert run_fingerprint(fp32) == run_fingerprint(same) != run_fingerprint(bf16)
    ins = Instruction.for_round(bf16, 1, 0.1)
    assert Instruction.from_config(ins.to_config()).transfer == bf16.transfer
    without = json.loads(ins.to_config()["instruction"])
    del without["transfer"]  # not set: plain fp32 weights
    assert Instruction.from_config({"instruction": json.dumps(without)}).transfer == TransferConfig()


# ------------------------------------------------------------------------- the validator
def _master() -> dict[str, torch.Tensor]:
    return {"backbone.w": _tensor(5), "heads.a.weight": _tensor(6, shape=(2, 11))}


def _payload(cfg: TransferConfig, seed: int = 7):
    master = _master()
    student = {k: v + _tensor(seed, 0.01, tuple(v.shape)) for k, v in master.items()}
    p = encode_update(student, master, cfg)
    arrays = ArrayRecord({k: raw_array(v) for k, v in p.arrays.items()})  # as sites send them
    scales = ArrayRecord({k: raw_array(v) for k, v in p.scales.items()}) if p.scales else None
    return master, student, arrays, dict(p.manifest), scales


TOLERANCE = {"fp16": (2**-11, 0.0), "bf16": (2**-8, 0.0), "bf16-delta": (0.0, 2e-4),
             "int8-delta": (0.0, 2e-4)}


@pytest.mark.parametrize("enc", [
    {"dtype": "fp16"}, {"dtype": "bf16"}, {"dtype": "bf16", "delta": True},
    {"dtype": "int8", "delta": True},
])
def test_declared_encodings_are_accepted_and_summed_in_fp32(enc):
    cfg = TransferConfig(**enc)
    master, student, arrays, encoding, scales = _payload(cfg)
    agg = StreamingAggregator(master)
    update = as_update(Tensors(arrays), encoding, Tensors(scales), master, cfg.encoding)
    agg.add("s1", update, 4, {"a": 4})
    agg.add("s2", {k: v.clone() for k, v in master.items()}, 4, {"a": 4})
    out = agg.result()
    for k in master:
        decoded = update[k]
        assert decoded.dtype == torch.float32
        torch.testing.assert_close(out[k], (decoded + master[k]) / 2)
        rtol, atol = TOLERANCE[cfg.encoding]  # differences of ~0.01: deltas lose far less
        torch.testing.assert_close(decoded, student[k], rtol=rtol, atol=atol)


def _scales(scales) -> np.ndarray:
    return Tensors(scales)[SCALES_KEY].numpy()


def _with_first(values: np.ndarray, first: float) -> np.ndarray:
    out = values.copy()
    out[0] = first
    return out


def _bad(case: str):
    cfg = TransferConfig(dtype="int8", delta=True) if "scale" in case else TransferConfig(dtype="bf16")
    master, _, arrays, encoding, scales = _payload(cfg)
    expected = cfg.encoding
    k = "backbone.w"
    if case == "per-tensor-manifest":
        encoding[k] = expected
    elif case == "other-encoding":
        encoding["arrays"] = "fp16"
    elif case == "no-manifest":
        encoding = None
    elif case == "payload-not-declared-dtype":
        arrays[k] = Array(master[k].numpy())  # fp32 bytes declared as bf16
    elif case == "forged-npy":  # Array says uint16, its .npy bytes hold float32
        good = arrays[k]
        fake = Array(master[k].numpy())
        arrays[k] = Array(dtype=good.dtype, shape=good.shape, stype=fake.stype, data=fake.data)
    elif case == "forged-raw":  # more bytes than the declared dtype and shape hold
        good = arrays[k]
        arrays[k] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                          data=good.data + b"\0\0")
    elif case == "manifest-in-fp32-run":
        expected = "fp32"
    elif case == "missing-scale":  # one scale short of the int8 tensors
        scales[SCALES_KEY] = Array(_scales(scales)[:-1].copy())
    elif case == "extra-scale":
        scales[SCALES_KEY] = Array(np.append(_scales(scales), np.float32(1.0)))
    elif case == "scale-per-tensor":  # the old layout: one scalar Array per tensor
        scales = ArrayRecord({n: Array(np.asarray(v)) for n, v in
                              unpack_scales(list(arrays), _scales(scales)).items()})
    elif case == "scale-matrix":
        scales[SCALES_KEY] = Array(np.ones((len(arrays), 1), np.float32))
    elif case == "scale-fp64":
        scales[SCALES_KEY] = Array(_scales(scales).astype(np.float64))
    elif case == "scale-nan":
        scales[SCALES_KEY] = Array(_with_first(_scales(scales), np.nan))
    elif case == "scale-negative":
        scales[SCALES_KEY] = Array(_with_first(_scales(scales), -0.1))
    return master, as_update(Tensors(arrays), encoding, Tensors(scales) if scales else None,
                             master, expected)


@pytest.mark.parametrize("case,reason", [
    ("per-tensor-manifest", r"manifest keys \['arrays', 'backbone.w'\]"),
    ("other-encoding", "declares encoding 'fp16', this run's transfer is bf16"),
    ("no-manifest", "does not declare the encoding"),
    ("payload-not-declared-dtype", "backbone.w: payload is float32, encoding bf16 sends uint16"),
    ("forged-npy", r"backbone.w: payload holds float32 \[37, 11\], not the declared uint16"),
    ("forged-raw", r"backbone.w: 816 bytes do not hold uint16 \[37, 11\]"),
    ("manifest-in-fp32-run", "plain fp32 weights"),
    ("missing-scale", r"float32 \[1\], expected float32 \[2\]: one per int8 tensor"),
    ("extra-scale", r"float32 \[3\], expected float32 \[2\]"),
    ("scale-per-tensor", r"keys \['backbone.w', 'heads.a.weight'\], expected \['int8'\]"),
    ("scale-matrix", r"float32 \[2, 1\], expected float32 \[2\]"),
    ("scale-fp64", r"float64 \[2\], expected float32 \[2\]"),
    ("scale-nan", "backbone.w: int8 scale is nan"),
    ("scale-negative", "backbone.w: int8 scale is -0.1"),
])
def test_validator_rejects_undeclared_or_mismatched_encodings(case, reason):
    master, update = _bad(case)
    agg = StreamingAggregator(master)
    with pytest.raises(UpdateRejected, match=reason) as e:
        agg.add("evil", update, 10, {"a": 10})
    assert agg.report.rejected["evil"] == str(e.value) and agg.num_accepted == 0
    out = agg.result()
    assert all(torch.equal(out[k], master[k]) for k in master)


# ------------------------------------------------------------------------- egress guard
@pytest.fixture
def guard_setup(tmp_path):
    """A train message of a run with ``transfer``, to the site that trains only 'ped'."""
    def make(transfer):
        rc = write_sim(tmp_path, transfer=transfer)
        sim, _, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
        fed = sim.federation()
        torch.manual_seed(0)
        master = float_state(create_model(fed.model, fed.task_specs()))
        set_server_identity()
        content = RecordDict({
            "config": ConfigRecord(Instruction.for_round(fed, 1, 1e-3).to_config()),
            "arrays": ArrayRecord(dict(master))})
        msg = Message(content, dst_node_id=2, message_type="train", group_id="1")
        msg.metadata.__dict__["_message_id"] = "m1"
        ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=dict(rc))
        own = {k: v + 0.01 for k, v in master.items() if head_task(k) in (None, "ped")}
        return master, own, msg, ctx
    return make


def _reply(msg, arrays, encoding=None, scales=None, raw=False):
    def array(v):
        return raw_array(np.asarray(v)) if raw else Array(np.asarray(v))

    content = RecordDict({
        "arrays": ArrayRecord({k: array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 8.0, "num-examples.ped": 8.0}),
        "site": ConfigRecord({"name": "hosp-b", "tasks": ["ped"]}),
    })
    if encoding is not None:
        content["encoding"] = ConfigRecord(encoding)
    if scales is not None:
        content["scales"] = ArrayRecord({k: array(v) for k, v in scales.items()})
    return Message(content, reply_to=msg)


def _passes(msg, ctx, reply) -> bool:
    out = egress_guard(msg, ctx, lambda m, c: reply)
    assert out is reply or (out.has_error() and out.error.code == EGRESS_BLOCKED)
    return out is reply


@pytest.mark.parametrize("transfer", ["fp16", "bf16", {"dtype": "int8", "delta": True}])
def test_egress_guard_accepts_the_declared_encoding(guard_setup, transfer):
    master, own, msg, ctx = guard_setup(transfer)
    cfg = TransferConfig.model_validate(transfer)
    p = encode_update(own, master, cfg)
    assert _passes(msg, ctx, _reply(msg, p.arrays, p.manifest, p.scales or None))
    assert _passes(msg, ctx, _reply(msg, p.arrays, p.manifest, p.scales or None, raw=True))


@pytest.mark.parametrize("case", [
    "fp32-in-bf16-run", "no-manifest", "other-encoding", "free-text", "free-text-key",
    "scales-in-bf16-run", "int16-as-bf16",
])
def test_egress_guard_blocks_undeclared_bf16(guard_setup, case):
    master, own, msg, ctx = guard_setup("bf16")
    p = encode_update(own, master, TransferConfig(dtype="bf16"))
    arrays, encoding, scales = dict(p.arrays), dict(p.manifest), None
    k = next(iter(own))
    if case == "fp32-in-bf16-run":
        arrays, encoding = {n: v.numpy() for n, v in own.items()}, None
    elif case == "no-manifest":
        encoding = None
    elif case == "other-encoding":
        encoding["arrays"] = "fp16"
    elif case == "free-text":
        encoding["arrays"] = "patient 0042, J. Doe"
    elif case == "free-text-key":
        encoding["note"] = "patient 0042, J. Doe"
    elif case == "scales-in-bf16-run":
        scales = {k: np.array(1.0, np.float32)}
    elif case == "int16-as-bf16":
        arrays[k] = arrays[k].view(np.int16)
    assert not _passes(msg, ctx, _reply(msg, arrays, encoding, scales))


@pytest.mark.parametrize("case", ["no-scales", "scale-vector", "int64-as-int8", "bf16-in-int8-run",
                                  "manifest-in-fp32-run"])
def test_egress_guard_blocks_undeclared_int8(guard_setup, case):
    transfer = "fp32" if case == "manifest-in-fp32-run" else {"dtype": "int8", "delta": True}
    master, own, msg, ctx = guard_setup(transfer)
    p = encode_update(own, master, TransferConfig(dtype="int8", delta=True))
    arrays, encoding, scales = dict(p.arrays), dict(p.manifest), dict(p.scales)
    k = next(iter(own))
    if case == "no-scales":
        scales = None
    elif case == "scale-vector":  # one scale too many
        scales[SCALES_KEY] = np.ones(len(arrays) + 1, np.float32)
    elif case == "int64-as-int8":
        arrays[k] = arrays[k].astype(np.int64)
    elif case == "manifest-in-fp32-run":
        scales = None  # so the manifest itself is what gets blocked
    elif case == "bf16-in-int8-run":
        q = encode_update(own, master, TransferConfig(dtype="bf16", delta=True))
        arrays, encoding, scales = q.arrays, q.manifest, None
    assert not _passes(msg, ctx, _reply(msg, arrays, encoding, scales))


# ------------------------------------------------------------------------- federated runs
def _run(tmp_path, name, transfer, rounds=1):
    (tmp_path / name).mkdir()
    rc = write_sim(tmp_path / name, rounds=rounds, evaluate_every=0,
                   **({"transfer": transfer} if transfer else {}))
    cfg, run_dir = federation_from_run_config(rc)
    seen: list = []
    grid = InProcessGrid(client_app, 2, rc,
                     on_reply=lambda m: _inspect(m, seen, cfg.transfer.encoding))
    ArkFederation(cfg, run_dir, poll_interval=0.0).start(grid)
    assert json.loads((run_dir / "state.json").read_text())["finished"]
    assert sorted(k for k, _ in seen) == (["query"] * 2 + ["query.tasks"] * 2
                                          + ["train"] * 2 * rounds + ["train.heads"] * 4)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert all(x["accepted"] and x["encoding"] == cfg.transfer.encoding for x in train)
    audit = [r for r in read_audit(run_dir / "audit.jsonl")
             if r["event"] == "update" and r["kind"] == "train"]
    for x in train:  # the server's audit, the metrics line and the site's audit agree
        srv = [r for r in audit if r["site"] == x["site"] and r["round"] == x["round"]]
        assert [r["bytes"] for r in srv] == [x["bytes"]]
        site = [r for r in read_audit(run_dir / "sites" / x["site"] / "audit.jsonl")
                if r["kind"] == "train" and r["round"] == x["round"]]
        assert [r["bytes"] for r in site] == [x["bytes"]]
    return cfg, run_dir, {(x["site"], x["round"]): x["bytes"] for x in train}


@pytest.fixture(scope="module")
def fp32_bytes(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fp32"), "fp32", None)[2]


@pytest.mark.parametrize("transfer,bound", [
    ("fp16", 0.5), ("bf16", 0.5), ({"dtype": "bf16", "delta": True}, 0.5),
    ({"dtype": "int8", "delta": True, "error_feedback": True}, 0.27),
])
def test_federated_run_sends_fewer_bytes_per_site_and_round(tmp_path, fp32_bytes, transfer, bound):
    ef = isinstance(transfer, dict) and transfer.get("error_feedback", False)
    cfg, run_dir, sizes = _run(tmp_path, "run", transfer, rounds=2 if ef else 1)
    for (site, round_), n in sizes.items():
        ratio = n / fp32_bytes[(site, 1)]
        assert ratio <= bound, (site, round_, ratio)
        assert ratio >= bound / 2 - 0.02  # the same tensors, not a reply that lost some
    if ef:  # each site keeps the residual of its latest round, per run
        for site in ("hosp-a", "hosp-b"):
            d = run_dir / "sites" / site / run_fingerprint(cfg)
            assert sorted(p.name for p in d.glob("residual_*")) == [
                "residual_round_001.safetensors", "residual_round_002.safetensors"]


def test_site_error_feedback_residual_survives_a_replayed_round(tmp_path):
    rc = write_sim(tmp_path, transfer={"dtype": "int8", "delta": True, "error_feedback": True})
    site = Site.from_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"], 1)
    sim, _, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    fed = sim.federation()
    torch.manual_seed(0)
    master = float_state(create_model(fed.model, fed.task_specs()))
    student = {k: v + 1e-3 * torch.randn(v.shape) for k, v in master.items()
               if head_task(k) in (None, "ped")}

    def encode(round_):
        return site.encode(Instruction.for_round(fed, round_, 1e-3), master, student)

    first, second = encode(1), encode(2)
    assert not all(np.array_equal(first.arrays[k], second.arrays[k]) for k in student)
    for _ in range(2):  # the server replays round 2 (twice): the residual of round 1 again
        replay = encode(2)
        assert all(np.array_equal(replay.arrays[k], second.arrays[k]) for k in student)
    store = ResidualStore(site.state_dir, run_fingerprint(fed))
    assert store.rounds() == [1, 2]
    for k in student:  # what round 2 lost is what it stored for round 3
        torch.testing.assert_close(store.load(2)[k], replay.residual[k])


def test_payload_nbytes_counts_arrays_scales_and_manifest():
    arrays = {"w": raw_array(np.zeros((4, 4), np.int8))}  # raw: no .npy header
    scales = {SCALES_KEY: raw_array(np.array([1.0], np.float32))}
    n = payload_nbytes(arrays, scales, {"arrays": "int8-delta"})
    assert n == 16 + 4 + len("arrays") + len("int8-delta")
    npy = Array(np.zeros((4, 4), np.float32))
    assert payload_nbytes({"w": npy}) == len(npy.data) > 64
    assert payload_nbytes({"w": np.zeros(3, np.float32)}) == 12
