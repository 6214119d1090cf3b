"""Replies pulled from a SuperLink's object store one Array at a time (server/pull.py).

The store below keeps what a SuperLink keeps for a reply: Flower's own deflated objects by
id and the reply's object tree, answered through the Runtime API calls Flower's HttpGrid
makes; the replies come from the real ClientApp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fed_helpers import write_sim
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from ark_core.fed.aggregate import UpdateRejected, UpdateValidator
from ark_core.fed.federation import load_simulation
from ark_core.fed.transfer import TransferConfig, encode_update
from ark_core.model.checkpoint import load_tensors
from client.app import app as client_app
from ops.arrays import Tensors, payload_nbytes, raw_array
from server.exchange import read_reply
from server.loop import ArkFederation
from server.pull import ObjectPull
from simulations.inprocess import InProcessGrid, set_server_identity

torch.set_num_threads(1)


class Store:
    """A SuperLink's object store and the Runtime API calls on it, over ``replies``."""

    def __init__(self, replies) -> None:
        self.replies = replies  # message ids -> the replies that have arrived
        self.objects: dict[str, bytes] = {}
        self.pulled = 0  # bytes of object content served
        self.confirmed: list[str] = []
        self.lose: set[str] = set()  # object ids to report as missing

    def PullMessages(self, request):  # noqa: N802 - the Runtime API's names
        protos, trees = [], []
        for reply in self.replies(list(request.message_ids)):
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.objects |= {k: o.deflate() for k, o in get_all_nested_objects(reply).items()}
            protos.append(message_to_proto(remove_content_from_message(reply)))
            trees.append(get_object_tree(reply))
        return PullAppMessagesResponse(messages_list=protos, message_object_trees=trees)

    def PullObject(self, request):  # noqa: N802
        content = self.objects.get(request.object_id)
        if content is None or request.object_id in self.lose:
            return PullObjectResponse(object_found=False, object_available=False)
        self.pulled += len(content)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


class StoreGrid(InProcessGrid):
    """The real ClientApp's replies, served from a :class:`Store` as a SuperLink does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node = Node(node_id=SUPERLINK_NODE_ID)
        self._runtime_client = Store(lambda ids: InProcessGrid.pull_messages(self, ids))

    def pull_messages(self, message_ids):
        raise AssertionError("a SuperLink's replies are pulled through server.pull")


class Grid1:
    """The smallest Grid :class:`ObjectPull` reads: a run, a node, a runtime client."""

    def __init__(self, store: Store) -> None:
        self._runtime_client, self.node = store, Node(node_id=SUPERLINK_NODE_ID)
        self.run = type("Run", (), {"run_id": 1})()


def _reply() -> tuple[Message, dict[str, np.ndarray]]:
    set_server_identity(1)
    rng = np.random.default_rng(0)
    values = {"big": rng.standard_normal((3, 700_000), dtype=np.float32),  # 2 chunks of 5 MB
              "zeros": np.zeros((4, 700_000), np.float32),  # its chunks are one object
              "bias": rng.standard_normal(7).astype(np.float32)}
    ins = Message(RecordDict({}), dst_node_id=5, message_type="train")
    ins.metadata.__dict__["_message_id"] = "ins-1"
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in values.items()}),
        "metrics": MetricRecord({"num-examples": 12.0}),
        "site": ConfigRecord({"name": "hosp-a", "tasks": ["nih"]}),
    })
    return Message(content, reply_to=ins), values


def test_a_reply_is_read_tensor_by_tensor_and_each_tensor_pulls_only_its_chunks():
    reply, values = _reply()
    store = Store(lambda ids: [reply] if ids == ["ins-1"] else [])
    pull = ObjectPull(Grid1(store))
    [(msg, records)] = pull.pull(["ins-1"])
    total = sum(len(c) for c in store.objects.values())
    assert store.pulled < 0.001 * total  # the message, its records and the arrays' fields only
    r = read_reply(msg, 5, records=records)
    assert (r.site, r.tasks, r.metrics) == ("hosp-a", ["nih"], {"num-examples": 12.0})
    before = store.pulled
    assert np.array_equal(r.arrays["big"].numpy(), values["big"])
    assert before + 8_400_000 < store.pulled < before + 8_500_000  # its two chunks, once
    for name, v in values.items():  # and again: nothing is kept
        assert np.array_equal(r.arrays[name].numpy(), v)
    whole = ArrayRecord({k: Array(v) for k, v in values.items()})
    assert r.nbytes == payload_nbytes(whole)
    pull.confirm(msg.metadata.message_id)
    assert store.confirmed == [reply.object_id]


def test_an_encoded_reply_is_checked_from_its_fields_and_pulled_once_by_the_validator():
    rng = np.random.default_rng(1)
    master = {"big": torch.from_numpy(rng.standard_normal((3, 700_000), dtype=np.float32)),
              "bias": torch.zeros(7)}
    student = {k: v + 0.01 for k, v in master.items()}
    p = encode_update(student, master, TransferConfig(dtype="int8", delta=True))
    ins = Message(RecordDict({}), dst_node_id=5, message_type="train")
    ins.metadata.__dict__["_message_id"] = "ins-1"
    reply = Message(RecordDict({
        "arrays": ArrayRecord({k: raw_array(v) for k, v in p.arrays.items()}),
        "scales": ArrayRecord({k: raw_array(v) for k, v in p.scales.items()}),
        "encoding": ConfigRecord(p.manifest),
        "metrics": MetricRecord({"num-examples": 12.0}),
        "site": ConfigRecord({"name": "hosp-a", "tasks": []}),
    }), reply_to=ins)
    store = Store(lambda ids: [reply] if ids == ["ins-1"] else [])
    [(msg, records)] = ObjectPull(Grid1(store)).pull(["ins-1"])
    update = read_reply(msg, 5, records=records).update(master, "int8-delta")
    validator = UpdateValidator(master)
    before = store.pulled
    update.check_encoding(validator.expected([]))
    assert store.pulled - before < 1_000  # the scales vector: the tensors' fields sufficed
    validator.check(update, [])
    payload = sum(a.nbytes for a in p.arrays.values())
    assert payload < store.pulled - before < 1.01 * payload  # each tensor pulled once


def test_lost_objects_reject_the_tensor_or_make_an_error_reply():
    reply, _ = _reply()
    store = Store(lambda ids: [reply])
    chunk = reply.content.array_records["arrays"]["big"].slice_array()[1][0]
    store.lose.add(chunk)
    [(msg, records)] = ObjectPull(Grid1(store)).pull(["ins-1"])
    arrays = Tensors(records["arrays"])
    assert arrays["bias"].shape == (7,)
    with pytest.raises(UpdateRejected, match="big: not pulled from the SuperLink"):
        arrays["big"]
    store.lose.add(reply.content.object_id)  # the record dict itself: no reply to read
    [(msg, records)] = ObjectPull(Grid1(store)).pull(["ins-1"])
    assert msg.has_error() and records == {}
    assert msg.metadata.reply_to_message_id == "ins-1"


def test_a_round_through_the_object_store_equals_one_through_pull_messages(tmp_path):
    masters, pulled = [], []
    for name, grid_cls in (("whole", InProcessGrid), ("objects", StoreGrid)):
        (tmp_path / name).mkdir()
        rc = write_sim(tmp_path / name, rounds=1, evaluate_every=0)
        cfg = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])[0].federation()
        grid = grid_cls(client_app, 2, rc)
        run = ArkFederation(cfg, rc["run-dir"], poll_interval=0.0, node_wait_s=0.0).start(grid)
        masters.append({role: load_tensors(run.path / f"master_{role}.safetensors")
                        for role in ("student", "teacher")})
        if grid_cls is StoreGrid:  # every reply confirmed once folded: tasks asked, train,
            store = grid._runtime_client  # teachers, student and teacher heads calibrated
            assert len(set(store.confirmed)) == len(store.confirmed) == 5 * 2
            pulled.append(store.pulled)
    for role, tensors in masters[0].items():
        assert tensors.keys() == masters[1][role].keys()
        assert all(torch.equal(v, masters[1][role][k]) for k, v in tensors.items())
    assert pulled[0] > 0
