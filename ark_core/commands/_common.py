"""What the downstream commands share: arguments, the task YAML, tables and JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import TaskConfig, load_yaml, parse_config, resolve_path


def add_common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("model", help="model file (.safetensors, or a released Ark checkpoint)")
    p.add_argument("--data", type=Path, required=True,
                   help="task YAML: one task mapping (name, dataset, root, ...) or a config with tasks:")
    p.add_argument("--task", help="which task of a YAML with several (default: the first)")
    p.add_argument("--out", type=Path, help="output JSON (default: <command>-<task>.json here)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CIs")
    p.add_argument("--seed", type=int, default=0)


def load_task(path: Path, name: str | None = None) -> tuple[TaskConfig, Path]:
    """The task a YAML describes and the directory its relative root resolves against."""
    data, text = load_yaml(path)
    base = path.resolve().parent
    if isinstance(data, dict) and "tasks" in data:
        if data.get("data_root"):
            base = resolve_path(Path(data["data_root"]), base)
        tasks = data["tasks"]
        pick = [t for t in tasks if name is None or t.get("name") == name]
        if not pick:
            raise ValueError(f"{path}: no task named {name!r}")
        data = pick[0]
    return parse_config(data, TaskConfig, source=str(path), text=text), base


def load(args: argparse.Namespace):
    """(model, task config, manifests per split) for a command's arguments."""
    from ..data import build_manifests
    from ..model.factory import load_model

    cfg, base = load_task(args.data, args.task)
    model = load_model(args.model, device=args.device) if getattr(args, "model", None) else None
    return model, cfg, build_manifests(cfg, base)


def out_path(args: argparse.Namespace, command: str, task: str, suffix: str = ".json") -> Path:
    p = args.out or Path(f"{command}-{task}.json")
    return p.with_suffix(suffix)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    print(f"wrote {path}")


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def metrics_table(m: dict, title: str = "") -> str:
    """Per label: n, positives, AUC [95% CI], AP and the thresholded metrics."""
    head = f"{'label':<28} {'n':>5} {'pos':>5} {'AUC [95% CI]':>22} {'AP':>6} {'thr':>6} " \
           f"{'sens':>6} {'spec':>6} {'F1':>6}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for label, e in m["classes"].items():
        ci = f"[{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]" if e.get("auc_ci") else ""
        lines.append(
            f"{label[:28]:<28} {e['n']:>5} {e['positives']:>5} {_f(e['auc']) + ' ' + ci:>22} "
            f"{_f(e['ap']):>6} {_f(e['threshold']):>6} {_f(e['sensitivity']):>6} "
            f"{_f(e['specificity']):>6} {_f(e['f1']):>6}"
        )
    ci = m.get("auc_mean_ci")
    ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    lines.append(f"mean AUC {_f(m['auc_mean'])}{ci_s} over {m['n']} images, {m['patients']} patients")
    return "\n".join(lines)
