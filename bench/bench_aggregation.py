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
  tasks, every reply pulled, checked and folded in, the average loaded into the master. The
  replies reach it as Flower's ``pull_messages`` hands them over: the reply's objects (the
  deflated Arrays and their chunks, one reply's worth of bytes, built tensor by tensor) are
  inflated by Flower's own ``inflate_object_from_contents``. Pushed messages keep no content:
  in a deployment they sit in the SuperLink's process.
- ``adds``: the floor: the first reply times its weight into a new accumulator, then
  in-place ``acc.add_(x, alpha=w)`` over the same values already in torch tensors, then one
  in-place division.

Times are CPU seconds of the (single-threaded) process, so that other processes on the
machine do not distort them. Both receive the replies as Flower ArrayRecords (``Array`` =
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
    and both heads: every site trains both tasks).
    """

    def __init__(self, sites: int) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        # What Flower's runtime sets in a ServerApp process before ``main`` runs.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.nodes = list(range(2, sites + 2))
        self._pending: dict[str, object] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._run = Run.create_empty(run_id=1)

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

    def pull_messages(self, message_ids):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        out = []
        for mid in list(message_ids):
            stub = self._pending.pop(mid, None)
            if stub is None:
                continue
            node = stub.metadata.dst_node_id
            site = ConfigRecord({"name": f"site-{node}", "tasks": list(TASKS)})
            if stub.metadata.message_type != "train":  # query.tasks
                out.append(Message(RecordDict({"metrics": MetricRecord({}), "site": site}),
                                   reply_to=stub))
                continue
            n = 100.0 + 10 * node
            metrics = MetricRecord({"num-examples": n, **{f"num-examples.{t}": n for t in TASKS}})
            reply_id, contents = _wire_reply(stub, self._shapes.pop(mid), node, metrics, site)
            msg = inflate_object_from_contents(reply_id, contents)  # as HttpGrid.pull_messages
            msg.metadata.__dict__["_message_id"] = reply_id
            out.append(msg)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _wire_reply(ins, shapes, seed, metrics, site) -> tuple[str, dict[str, bytes]]:
    """A train reply as the SuperLink stores it: object id -> deflated bytes.

    Built one tensor at a time: each Array is deflated (with its chunks) and its bytes
    dropped, keeping only its id, so the process never holds more than these contents.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    rng = np.random.default_rng(seed)
    contents: dict[str, bytes] = {}
    record = ArrayRecord()
    for name, shape in shapes.items():
        a = Array.from_numpy_ndarray(rng.standard_normal(shape, dtype=np.float32))
        for cid, chunk in a.slice_array():
            contents[cid] = chunk.deflate()
        contents[a.object_id] = a.deflate()
        a.__dict__["data"] = b""  # a shell: its id stays cached, its bytes go
        a.__dict__.pop("_chunks", None)
        record.__dict__["_data"][name] = a  # ArrayRecord(...) would copy the shells
    reply = Message(RecordDict({"arrays": record, "metrics": metrics, "site": site}),
                    reply_to=ins)
    for oid, obj in get_all_nested_objects(reply).items():
        if oid not in contents:
            contents[oid] = obj.deflate()
    return reply.object_id, contents


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
    elif mode == "loop":
        import tempfile

        from ark_core.config import ModelConfig
        from ark_core.fed.aggregate import float_state
        from ark_core.fed.federation import FederationConfig
        from server.loop import ArkFederation

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
            t = time.process_time()
            record = fed.train_round(WireGrid(sites), master, 1)
            seconds = time.process_time() - t
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
    modes = ("flower", "ours", "adds") + (() if args.no_loop else ("loop",))
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
            if mode == "loop":  # its own model: the full Ark+ (or tiny) float tensors
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
                             (loop["peak"] - loop["before"]) / loop["model"], "<= 3"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
