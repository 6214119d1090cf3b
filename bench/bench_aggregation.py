"""Peak memory and time of one round's aggregation: ark_core's streaming aggregator vs Flower.

For a Swin-L-sized Ark+ model (the float tensors of ``ark_plus`` with two 14-label heads,
197M values, 753 MiB in fp32; dummy values) and 2, 4 and 8 sites, each measurement runs in a
fresh process and reads that process's peak RSS (``resource.getrusage``):

- ``flower``: Flower 1.42's ``FedAvg.aggregate_train`` (flwr.serverapp.strategy) over the
  sites' reply Messages, all at hand as ``Strategy.start`` passes them; the master it sent
  is held as an ArrayRecord, as ``start`` holds it.
- ``ours``: :class:`ark_core.fed.aggregate.StreamingAggregator`: each reply's ArrayRecord, viewed
  as tensors (:class:`ops.arrays.Tensors`), is
  validated (names, shapes, dtypes, finite values), folded into fp32 running sums and
  dropped before the next arrives, as the ServerApp's push/pull loop does; the master is
  held as torch tensors, as the ServerApp holds its model.
- ``loop``: the ServerApp's whole round, :meth:`server.loop.ArkFederation.train_round`:
  the master (an ``ArkModel``) serialised into the messages and pushed, each site asked its
  tasks, every reply pulled, checked and folded in, the average loaded into the master, with
  the ServerApp's malloc setting (:mod:`ops.memory`). The replies are pulled as
  :mod:`server.pull` pulls them from a SuperLink: the message and its small objects, then
  each tensor's chunks when the fold reads it. The object store answering those Runtime API
  calls (:class:`WireStore`) runs in a forked process, as a SuperLink does, and makes each
  chunk's bytes when asked. Pushed messages keep no content: in a deployment they sit in
  the SuperLink's process.
- ``pullall``: the same round with the replies as Flower's own ``Grid.pull_messages`` hands
  them over: all of a reply's objects (one reply's worth of bytes, built tensor by tensor)
  inflated by Flower's ``inflate_object_from_contents``.
- ``adds``: the floor: the first reply times its weight into a new accumulator, then
  in-place ``acc.add_(x, alpha=w)`` over the same values already in torch tensors, then one
  in-place division.

Times are CPU seconds of the (single-threaded) process, so that other processes on the
machine do not distort them (``loop`` and ``pullall``: less the CPU time spent making the
replies' values in this process). Both receive the replies as Flower ArrayRecords (``Array`` =
serialised numpy), built one tensor at a time so that making a reply never holds more than
the reply itself. Figures are
printed as multiples of the model size, total and above the process's RSS before the round
(imports and the master), and as ratios. Run sizes one after another (8 sites x 753 MiB of
replies fit in 24 GiB, two such runs side by side might not).

Usage: ``python bench/bench_aggregation.py [--quick] [--sites 2,4,8] [--no-loop]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from _util import MIB, current_rss_bytes, machine, peak_rss_bytes, ratio_line, run_child

TASKS = ("nih", "cxp")


def layout(quick: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape: the Ark+ model's float tensors, or a 10M-value stand-in."""
    import torch

    from ark_core.config import ModelConfig
    from ark_core.model.network import ArkModel
    from ark_core.tasks import TaskSpec, TaskType

    specs = [TaskSpec(t, tuple(f"l{i}" for i in range(14)), TaskType.MULTILABEL) for t in TASKS]
    if quick:
        shapes = {f"backbone.blocks.{i}.weight": (512, 1024) for i in range(20)}
        shapes |= {f"heads.{t}.weight": (14, 512) for t in TASKS} | {
            f"heads.{t}.bias": (14,) for t in TASKS
        }
        return shapes
    cfg = ModelConfig(preset="ark_plus")
    with torch.device("meta"):  # shapes only, no memory
        model = ArkModel(cfg.backbone, specs, img_size=cfg.img_size,
                         projector_dim=cfg.projector_dim, backbone_kwargs=cfg.backbone_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def reply_record(shapes: dict[str, tuple[int, ...]], seed: int):
    """One site's reply as Flower receives it: an ArrayRecord of serialised float32 arrays."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes.items():
        arrays[name] = Array.from_numpy_ndarray(rng.standard_normal(shape, dtype=np.float32))
    return ArrayRecord(arrays)


class WireGrid:
    """A Flower Grid of ``sites`` nodes that answer at once (see ``loop`` above).

    Train replies hold random float32 values of the shapes the master sent (shared tensors
    and both heads: every site trains both tasks). ``objects=True``: it also answers the
    Runtime API calls :mod:`server.pull` makes (``PullMessages``, ``PullObject``,
    ``ConfirmMessageReceived``) as a SuperLink's object store does, making each chunk's bytes
    when asked (:class:`WireStore`); else only ``pull_messages`` (Flower's whole pull).
    """

    def __init__(self, sites: int, objects: bool = True) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        # What Flower's runtime sets in a ServerApp process before ``main`` runs.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.nodes = list(range(2, sites + 2))
        self.node = Node(node_id=SUPERLINK_NODE_ID)
        self._pending: dict[str, object] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._run = Run.create_empty(run_id=1)
        if objects:
            self._runtime_client = WireStore(self)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from uuid import uuid4

        from flwr.app import Message, RecordDict

        ids = []
        for msg in messages:
            mid = uuid4().hex
            stub = Message(RecordDict({}), dst_node_id=msg.metadata.dst_node_id,
                           message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
            stub.metadata.__dict__["_message_id"] = mid
            arrays = msg.content.array_records.get("arrays")
            if arrays is not None:
                self._shapes[mid] = {k: tuple(a.shape) for k, a in arrays.items()}
            self._pending[mid] = stub
            ids.append(mid)
        return ids

    def reply(self, mid: str) -> tuple[object, dict[str, bytes], dict[str, tuple], object] | None:
        """The reply to ``mid``: (message, small objects' contents, chunk recipes, tree)."""
        from flwr.app import ConfigRecord, MetricRecord

        stub = self._pending.pop(mid, None)
        if stub is None:
            return None
        node = stub.metadata.dst_node_id
        site = ConfigRecord({"name": f"site-{node}", "tasks": list(TASKS)})
        if stub.metadata.message_type != "train":  # query.tasks
            return _wire_reply(stub, {}, node, MetricRecord({}), site)
        n = 100.0 + 10 * node
        metrics = MetricRecord({"num-examples": n, **{f"num-examples.{t}": n for t in TASKS}})
        return _wire_reply(stub, self._shapes.pop(mid), node, metrics, site)

    def pull_messages(self, message_ids):
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        out = []
        for mid in list(message_ids):
            got = self.reply(mid)
            if got is None:
                continue
            reply, contents, recipes, _ = got
            for key in dict.fromkeys(r[:3] for r in recipes.values()):  # one reply's bytes
                contents |= _tensor_chunks(*key)
            msg = inflate_object_from_contents(reply.object_id, contents)  # as HttpGrid
            msg.metadata.__dict__["_message_id"] = reply.object_id
            out.append(msg)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class WireStore:
    """A SuperLink's Runtime API over :class:`WireGrid`'s replies, for :mod:`server.pull`.

    The store runs in its own (forked) process, as a SuperLink does, and object contents
    reach the ServerApp through a pipe: this process holds only what the ServerApp does. The
    store keeps a reply's small objects and, for its chunks, how to make them: a chunk's bytes
    are made again when pulled (one tensor's chunks cached at a time).
    """

    def __init__(self, grid: WireGrid) -> None:
        import multiprocessing as mp
        import threading

        self.grid, self.lock = grid, threading.Lock()
        self.conn, theirs = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_serve, args=(theirs,), daemon=True)
        self.proc.start()

    def _ask(self, *request):
        with self.lock:  # Flower pulls objects from several threads
            self.conn.send(request)
            return self.conn.recv()

    def PullMessages(self, request):  # noqa: N802 - the Runtime API's names
        from flwr.proto.message_pb2 import Message as ProtoMessage
        from flwr.proto.message_pb2 import ObjectTree
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        protos, trees = [], []
        for mid in request.message_ids:
            stub = self.grid._pending.pop(mid, None)
            if stub is None:
                continue
            m = stub.metadata
            proto, tree = self._ask("reply", mid, m.message_type, m.dst_node_id, m.group_id,
                                    self.grid._shapes.pop(mid, {}))
            protos.append(ProtoMessage.FromString(proto))
            trees.append(ObjectTree.FromString(tree))
        return PullAppMessagesResponse(messages_list=protos, message_object_trees=trees)

    def PullObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        content = self._ask("object", request.object_id)
        if content is None:
            return PullObjectResponse(object_found=False, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse

        self._ask("confirm")
        return ConfirmMessageReceivedResponse()


def _serve(conn) -> None:
    """The store's process: answers :class:`WireStore`'s requests until the pipe closes."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto

    small: dict[str, bytes] = {}
    recipes: dict[str, tuple] = {}
    cached: tuple[tuple, dict[str, bytes]] = ((), {})
    while True:
        try:
            what, *args = conn.recv()
        except EOFError:
            return
        if what == "reply":
            mid, kind, node, group, shapes = args
            ins = Message(RecordDict({}), dst_node_id=node, message_type=kind, group_id=group)
            ins.metadata.__dict__["_message_id"] = mid
            site = ConfigRecord({"name": f"site-{node}", "tasks": list(TASKS)})
            n = 100.0 + 10 * node
            metrics = MetricRecord({"num-examples": n, **{f"num-examples.{t}": n for t in TASKS}}
                                   if kind == "train" else {})
            reply, contents, made, tree = _wire_reply(ins, shapes, node, metrics, site)
            small |= contents
            recipes |= made
            reply.metadata.__dict__["_message_id"] = reply.object_id
            proto = message_to_proto(remove_content_from_message(reply))
            conn.send((proto.SerializeToString(), tree.SerializeToString()))
        elif what == "object":
            oid = args[0]
            if oid in small:
                conn.send(small[oid])
            elif oid in recipes:
                if cached[0] != recipes[oid][:3]:
                    cached = ((), {})
                    cached = recipes[oid][:3], _tensor_chunks(*recipes[oid][:3])
                conn.send(cached[1][oid])
            else:
                conn.send(None)
        else:  # confirm: one reply at a time in this bench
            small.clear()
            recipes.clear()
            cached = ((), {})
            conn.send(None)


MADE = [0.0]  # CPU seconds spent making replies' tensors: the sites' and SuperLink's work


def _tensor_array(seed: int, index: int, shape: tuple[int, ...]):
    import numpy as np
    from flwr.app import Array

    t = time.thread_time()
    rng = np.random.default_rng([seed, index])
    a = Array.from_numpy_ndarray(rng.standard_normal(shape, dtype=np.float32))
    MADE[0] += time.thread_time() - t
    return a


def _tensor_chunks(seed: int, index: int, shape: tuple[int, ...]) -> dict[str, bytes]:
    """Chunk id -> deflated chunk of one reply tensor."""
    return {cid: chunk.deflate() for cid, chunk in _tensor_array(seed, index, shape).slice_array()}


def _wire_reply(ins, shapes, seed, metrics, site):
    """A reply as the SuperLink stores it: its message, the small objects' deflated bytes,
    chunk id -> (seed, tensor index, shape, chunk id), and its object tree.

    Built one tensor at a time: each Array is deflated and its bytes dropped, keeping only
    its id, so making a reply never holds more than one tensor.
    """
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    contents: dict[str, bytes] = {}
    recipes: dict[str, tuple] = {}
    trees: dict[str, object] = {}
    record = ArrayRecord()
    for index, (name, shape) in enumerate(shapes.items()):
        a = _tensor_array(seed, index, shape)
        for cid, _ in a.slice_array():
            recipes[cid] = (seed, index, shape, cid)
        contents[a.object_id] = a.deflate()
        trees[a.object_id] = ObjectTree(object_id=a.object_id, children=[
            ObjectTree(object_id=cid) for cid in a.children])
        a.__dict__["data"] = b""  # a shell: its id stays cached, its bytes go
        a.__dict__.pop("_chunks", None)
        record.__dict__["_data"][name] = a  # ArrayRecord(...) would copy the shells
    records = {"metrics": metrics, "site": site} | ({"arrays": record} if shapes else {})
    reply = Message(RecordDict(records), reply_to=ins)
    for oid, obj in get_all_nested_objects(reply).items():
        if oid not in contents:
            contents[oid] = obj.deflate()

    def tree(obj):
        if obj.object_id in trees:
            return trees[obj.object_id]
        return ObjectTree(object_id=obj.object_id,
                          children=[tree(c) for c in (obj.children or {}).values()])

    return reply, contents, recipes, tree(reply)


def child(mode: str, sites: int, quick: bool) -> dict:
    """One measurement in this (fresh) process."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    shapes = layout(quick)
    model_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    examples = [100.0 + 10 * i for i in range(sites)]
    if mode == "flower":
        from flwr.app import Message, MetricRecord, RecordDict
        from flwr.serverapp.strategy import FedAvg
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
        master = reply_record(shapes, seed=10_000)  # what start() keeps: the ArrayRecord it sent
        gc.collect()
        before = current_rss_bytes()
        replies = []
        for i in range(sites):
            ins = Message(RecordDict({}), dst_node_id=i + 2, message_type="train")
            content = RecordDict({"arrays": reply_record(shapes, seed=i),
                                  "metrics": MetricRecord({"num-examples": examples[i]})})
            replies.append(Message(content, reply_to=ins))
        t = time.process_time()
        arrays, _ = FedAvg().aggregate_train(1, replies)
        seconds = time.process_time() - t
        assert arrays is not None and len(arrays) == len(shapes)
        del master
    elif mode == "ours":
        from ark_core.fed.aggregate import StreamingAggregator
        from ops.arrays import Tensors

        master = {k: torch.zeros(s) for k, s in shapes.items()}
        gc.collect()
        before = current_rss_bytes()
        agg = StreamingAggregator(master)
        seconds = 0.0
        for i in range(sites):
            record = reply_record(shapes, seed=i)  # arrives
            t = time.process_time()
            agg.add(f"site-{i}", Tensors(record), examples[i],
                    {task: examples[i] for task in TASKS})
            seconds += time.process_time() - t
            del record  # dropped before the next reply arrives
        t = time.process_time()
        out = agg.result()
        seconds += time.process_time() - t
        assert len(out) == len(shapes)
    elif mode in ("loop", "pullall"):
        import tempfile

        from ark_core.config import ModelConfig
        from ark_core.fed.aggregate import float_state
        from ark_core.fed.federation import FederationConfig
        from ops.memory import fix_mmap_threshold
        from server.loop import ArkFederation

        fix_mmap_threshold()  # as server/app.py does
        labels = [f"l{i}" for i in range(14)]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = FederationConfig(
                model=ModelConfig(preset="tiny" if quick else "ark_plus"),
                catalogue=[{"name": t, "labels": labels, "task_type": "multilabel"}
                           for t in TASKS],
                rounds=1, min_sites=sites, retries=0, evaluate_every=0, run_dir=Path(tmp),
            )
            fed = ArkFederation(cfg, tmp, poll_interval=0.0, node_wait_s=0.0)
            master = fed._initial_master()
            model_bytes = 4 * sum(v.numel() for v in float_state(master).values())
            gc.collect()
            before = current_rss_bytes()
            t, MADE[0] = time.process_time(), 0.0
            record = fed.train_round(WireGrid(sites, objects=mode == "loop"), master, 1)
            seconds = time.process_time() - t - MADE[0]
            assert record is not None and len(record["sites"]) == sites, record
    elif mode == "adds":
        master = {k: torch.zeros(s) for k, s in shapes.items()}
        gc.collect()
        before = current_rss_bytes()
        sums: dict[str, torch.Tensor] = {}
        seconds = 0.0
        for i in range(sites):
            gen = torch.Generator().manual_seed(i)
            update = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
            t = time.process_time()
            for k, x in update.items():
                if k in sums:
                    sums[k].add_(x, alpha=examples[i])
                else:  # the accumulator is allocated, as any aggregator must own its sums
                    sums[k] = x * examples[i]
            seconds += time.process_time() - t
            del update, x
        t = time.process_time()
        total = sum(examples)
        for v in sums.values():
            v.div_(total)
        seconds += time.process_time() - t
    else:
        raise ValueError(mode)
    return {"mode": mode, "sites": sites, "peak": peak_rss_bytes(), "before": before,
            "model": model_bytes, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 10M-value model (CI smoke run)")
    p.add_argument("--sites", help="site counts, comma-separated (default 2,4,8; --quick: 2)")
    p.add_argument("--no-loop", action="store_true",
                   help="skip the whole-round measurement (it builds a random-init Ark+ model)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "SITES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.quick)))
        return 0
    sites = [int(s) for s in (args.sites or ("2" if args.quick else "2,4,8")).split(",")]
    print(f"machine: {machine()}")
    modes = ("flower", "ours", "adds") + (() if args.no_loop else ("pullall", "loop"))
    rows = {}
    for k in sites:
        for mode in modes:  # one at a time: never two big processes
            extra = ["--quick"] if args.quick else []
            rows[mode, k] = run_child(Path(__file__), [mode, str(k), *extra])
    model = rows["ours", sites[0]]["model"]
    print(f"model: {model / MIB:.0f} MiB of float32 values; x = multiples of the model size")
    print(f"{'sites':>5} {'mode':>7} {'peak RSS':>10} {'peak x':>7} {'above start x':>14} "
          f"{'time s':>8}")
    for k in sites:
        for mode in modes:
            r = rows[mode, k]
            if mode == "pullall":  # its own model: the full Ark+ (or tiny) float tensors
                print(f"{'':>5} {'':>7} (loop: model {r['model'] / MIB:.0f} MiB)")
            print(f"{k:>5} {mode:>7} {r['peak'] / MIB:>9.0f}M {r['peak'] / model:>7.2f} "
                  f"{(r['peak'] - r['before']) / model:>14.2f} {r['seconds']:>8.2f}")
    for k in sites:
        ours, flower, adds = rows["ours", k], rows["flower", k], rows["adds", k]
        print(ratio_line(f"peak_rss_ours_over_flower[{k} sites]", ours["peak"] / flower["peak"],
                         "< 1"))
        print(ratio_line(f"peak_rss_above_start_ours_over_flower[{k} sites]",
                         (ours["peak"] - ours["before"]) / (flower["peak"] - flower["before"]),
                         "< 1"))
        print(ratio_line(f"peak_rss_ours_over_model[{k} sites]", ours["peak"] / model, "<= 3"))
        print(ratio_line(f"peak_rss_ours_above_start_over_model[{k} sites]",
                         (ours["peak"] - ours["before"]) / model, "<= 3"))
        print(ratio_line(f"time_ours_over_inplace_adds[{k} sites]",
                         ours["seconds"] / adds["seconds"], "<= 2"))
        print(ratio_line(f"time_flower_over_inplace_adds[{k} sites]",
                         flower["seconds"] / adds["seconds"], "(reference)"))
        if "loop" in modes:
            loop = rows["loop", k]
            print(ratio_line(f"serverapp_round_peak_rss_over_model[{k} sites]",
                             loop["peak"] / loop["model"], "<= 3"))
            print(ratio_line(f"serverapp_round_peak_rss_above_start_over_model[{k} sites]",
                             (loop["peak"] - loop["before"]) / loop["model"], "<= 1.2"))
            whole = rows["pullall", k]
            print(ratio_line(f"serverapp_round_peak_rss_above_start_flower_pull_over_model"
                             f"[{k} sites]", (whole["peak"] - whole["before"]) / whole["model"],
                             "(reference)"))
            print(ratio_line(f"serverapp_round_time_over_flower_pull[{k} sites]",
                             loop["seconds"] / whole["seconds"], "(reference)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
