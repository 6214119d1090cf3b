"""An in-process Flower Grid: real Messages to the real ClientApp, one node per site.

The experiment harness (:mod:`simulations.experiment`) and the tests drive the real
ServerApp loop over it, without a SuperLink or worker processes. Like Flower's InMemoryGrid
it assigns message ids on push and returns replies on pull; the ClientApp runs when a reply
is pulled, with a fresh Context per message (as each message starts a fresh ClientApp
process in deployment), so replies are produced and folded in the order the server asks
for them: by node, i.e. in site order. An exception in the ClientApp becomes an error reply,
as Flower's runtime does. Each ClientApp gets its own Message and RecordDict, as the wire
gives each site its own copy, so a handler that takes a record out leaves the server's
message whole. ``tests/test_simulation.py`` shows a run over it gives the losses
of ``flwr run`` on the same configuration.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def set_server_identity(run_id: int = 1) -> None:
    """What Flower's runtime does in a ServerApp process before ``main`` runs."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _delivered(msg: Message) -> Message:
    """``msg`` as a site receives it: its own Message, metadata and RecordDict.

    The records themselves are shared: nothing in the ClientApp writes into them.
    """
    out = copy.copy(msg)
    out.__dict__["_metadata"] = copy.copy(msg.metadata)
    out.__dict__["_content"] = RecordDict(dict(msg.content))
    return out


class InProcessGrid(Grid):
    """Nodes 1..n; node i gets ``node_config = {"partition-id": i - 1, "num-partitions": n}``.

    Args:
        app: The ClientApp every node runs.
        num_nodes: Number of nodes.
        run_config: The run config each ClientApp sees.
        silent: Node ids that never reply.
        on_reply: Called with every reply before the server sees it; may return a
            replacement (tests tamper with replies or record them).
        crash_after: Raise ``KeyboardInterrupt`` in ``pull_messages`` as soon as this many
            replies have been produced, before the server reads the last (a server killed
            mid-round).
    """

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        run_config: dict,
        *,
        silent: Iterable[int] = (),
        on_reply: Callable[[Message], Message | None] | None = None,
        crash_after: int | None = None,
    ) -> None:
        self.app = app
        self.nodes = list(range(1, num_nodes + 1))
        self.run_config = dict(run_config)
        self.silent = set(silent)
        self.on_reply = on_reply
        self.crash_after = crash_after
        self.produced = 0
        self._pending: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        set_server_identity(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def _context(self, node: int) -> Context:
        cfg = {"partition-id": self.nodes.index(node), "num-partitions": len(self.nodes)}
        return Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(),
                       run_config=dict(self.run_config))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            msg = self._pending.get(mid)
            if msg is None or msg.metadata.dst_node_id in self.silent:
                continue
            del self._pending[mid]
            try:
                reply = self.app(_delivered(msg), self._context(msg.metadata.dst_node_id))
            except Exception as e:  # noqa: BLE001 - Flower turns any ClientApp failure into an error reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            self.produced += 1
            if self.crash_after is not None and self.produced >= self.crash_after:
                raise KeyboardInterrupt("server killed")
            if self.on_reply is not None:
                reply = self.on_reply(reply) or reply
            out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return self.pull_messages(self.push_messages(messages))
