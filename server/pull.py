"""Replies pulled from the SuperLink one Array at a time, so the ServerApp never holds a whole one.

Flower 1.42's ``Grid.pull_messages`` fetches every object of a reply (each ``Array`` is split
into 5 MB ``ArrayChunk`` objects) and then joins them into ``Array``s: for a moment the pulled
bytes and the arrays made from them are both in memory, 2x the reply. Here only the small
objects are pulled with the message (the message, its records, and each ``Array``'s dtype,
shape and chunk ids); an ``Array``'s chunks are pulled when the fold reads that tensor, and
dropped with it. The reply's objects stay in the SuperLink's object store until the reply is
confirmed, after the fold, so a tensor read twice (checked, then folded) is pulled twice over
the loopback instead of being kept.

This reads the Runtime API as Flower's own ``HttpGrid`` does (``PullMessages``, ``PullObject``,
``ConfirmMessageReceived`` on its ``_runtime_client``); a Grid without one (the simulation
engine's in-process Grid) is pulled whole, with ``pull_messages``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.supercore.constant import HEAD_BODY_DIVIDER, SYSTEM_MESSAGE_TYPE
from flwr.supercore.inflatable.inflatable_object import (
    get_object_body,
    get_object_head_values_from_object_content,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)

from ark_core.fed.aggregate import UpdateRejected

T = TypeVar("T")
BATCH = 4  # chunks (5 MB each) pulled at a time


@dataclass(frozen=True)
class PulledArray:
    """An ``Array``'s fields, its data as pulled (Flower's ``Array`` wants ``bytes``, a copy)."""

    dtype: str
    shape: tuple[int, ...]
    stype: str
    data: bytearray


class LazyArrays(Mapping[str, PulledArray]):
    """An ``ArrayRecord`` whose ``Array``s are pulled from the SuperLink each time one is read.

    Args:
        stubs: Name -> ``Array`` with dtype, shape and stype but no data.
        chunks: Name -> the object ids of its chunks, in order.
        pull: Object ids -> their contents (Flower's ``pull_objects``, with retries).
    """

    def __init__(self, stubs: Mapping[str, Array], chunks: Mapping[str, list[str]],
                 pull: Callable[[list[str]], dict[str, bytes]]) -> None:
        self.stubs, self.chunks, self.pull = stubs, chunks, pull
        self.sizes: dict[str, int] = {}  # name -> bytes of its data, once pulled
        self.pulled = 0  # bytes pulled so far, every read counted

    def __getitem__(self, name: str) -> PulledArray:
        stub, ids = self.stubs[name], self.chunks[name]
        last = {cid: i for i, cid in enumerate(ids)}  # a chunk may repeat (zeros, say)
        held: dict[str, bytes] = {}
        data = bytearray()  # grown in place: the tensor and a few chunks at most
        for start in range(0, len(ids), BATCH):
            try:
                held |= self.pull(sorted(set(ids[start:start + BATCH]) - held.keys()))
            except ObjectPullError as e:
                raise UpdateRejected(f"{name}: not pulled from the SuperLink ({e})") from None
            for i in range(start, min(start + BATCH, len(ids))):
                content = held[ids[i]]
                data += memoryview(content)[content.index(HEAD_BODY_DIVIDER) + 1:]
                if last[ids[i]] == i:
                    del held[ids[i]]
        self.sizes[name] = len(data)
        self.pulled += len(data)
        return PulledArray(stub.dtype, tuple(stub.shape), stub.stype, data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.stubs)

    def __len__(self) -> int:
        return len(self.stubs)

    def fields(self, name: str) -> tuple[tuple[int, ...], str]:
        """``name``'s shape and dtype as the reply declares them, nothing pulled."""
        stub = self.stubs[name]
        return tuple(stub.shape), stub.dtype

    def nbytes(self, name: str) -> int:
        """Bytes of ``name``'s data (pulled, and dropped, if it has not been read yet)."""
        if name not in self.sizes:
            self[name]
        return self.sizes[name]


class ObjectPull:
    """Pulls replies from a SuperLink's Runtime API with their ``Array``s left on the SuperLink.

    Args:
        grid: Flower's ``HttpGrid`` (or a wrapper forwarding its attributes).
        call: Runs one SuperLink call (``RetryingGrid``'s retries), or calls it once.
    """

    def __init__(self, grid: Any, call: Callable[[str, Callable[[], T]], T] | None = None) -> None:
        self.client = grid._runtime_client
        self.node, self.run_id = grid.node, grid.run.run_id
        self.call = call or (lambda what, fn: fn())
        self.fetch = make_pull_object_fn_protobuf(self.client.PullObject, self.node, self.run_id)

    @staticmethod
    def supports(grid: Any) -> bool:
        """Whether ``grid`` reaches a SuperLink over the Runtime API (else: pull whole)."""
        client = getattr(grid, "_runtime_client", None)
        return all(hasattr(client, m) for m in ("PullMessages", "PullObject",
                                                 "ConfirmMessageReceived"))

    def objects(self, ids: list[str]) -> dict[str, bytes]:
        return self.call("pull-objects", lambda: pull_objects(ids, self.fetch))

    def pull(self, message_ids: list[str]) -> list[tuple[Message, dict[str, LazyArrays]]]:
        """The replies to ``message_ids`` that have arrived, each with its lazy ArrayRecords.

        A reply whose objects cannot be pulled becomes an error reply, as in Flower's pull.
        """
        res = self.call("pull-messages", lambda: self.client.PullMessages(
            PullAppMessagesRequest(message_ids=message_ids)))
        out = []
        for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
            try:
                out.append(self._inflate(proto.metadata.message_id, tree))
            except ObjectPullError as e:
                out.append((self._unavailable(proto.metadata.reply_to_message_id, e), {}))
        return out

    def confirm(self, message_id: str) -> None:
        """Let the SuperLink delete the reply's objects (call once it has been folded)."""
        self.call("confirm", lambda: self.client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=self.node, run_id=self.run_id,
                                          message_object_id=message_id)))

    def _unavailable(self, reply_to: str, e: ObjectPullError) -> Message:
        return make_message(
            metadata=Metadata(run_id=self.run_id, message_id="", src_node_id=self.node.node_id,
                              dst_node_id=self.node.node_id, message_type=SYSTEM_MESSAGE_TYPE,
                              group_id="", ttl=0, reply_to_message_id=reply_to,
                              created_at=time.time()),
            error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                        reason=f"the reply's objects could not be pulled from the SuperLink: {e}"))

    def _inflate(self, msg_id: str, tree: Any) -> tuple[Message, dict[str, LazyArrays]]:
        contents: dict[str, bytes] = {}
        stubs: dict[str, Array] = {}
        chunks: dict[str, list[str]] = {}
        level = [tree]
        while level:  # breadth first, stopping at Arrays: their chunks stay on the SuperLink
            contents |= self.objects(sorted({t.object_id for t in level} - contents.keys()))
            below = []
            for t in level:
                kind, children, _ = get_object_head_values_from_object_content(
                    contents[t.object_id])
                if kind != Array.__qualname__:
                    below += list(t.children)
                elif t.object_id not in stubs:
                    meta = json.loads(get_object_body(contents[t.object_id], Array))
                    stubs[t.object_id] = Array(dtype=meta["dtype"], shape=tuple(meta["shape"]),
                                               stype=meta["stype"], data=b"")
                    chunks[t.object_id] = [children[i] for i in meta["arraychunk_ids"]]
            level = below
        lazy = {}
        for content in contents.values():  # record name -> its object, array name -> Array
            if get_object_head_values_from_object_content(content)[0] == RecordDict.__qualname__:
                for key, rid in json.loads(get_object_body(content, RecordDict)).items():
                    head = get_object_head_values_from_object_content(contents[rid])[0]
                    if head == ArrayRecord.__qualname__:
                        refs = json.loads(get_object_body(contents[rid], ArrayRecord))
                        lazy[key] = LazyArrays({n: stubs[a] for n, a in refs.items()},
                                               {n: chunks[a] for n, a in refs.items()},
                                               self.objects)
        msg = inflate_object_from_contents(msg_id, contents, objects=dict(stubs))
        msg.metadata.__dict__["_message_id"] = msg_id
        return msg, lazy

