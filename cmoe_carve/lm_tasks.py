"""lm-evaluation-harness tasks: found, checked and loaded before any model is.

A task is a registered name (piqa, arc_easy, ...), a name defined by a YAML file in an
`--include-path` folder, or a path to such a YAML file. A task whose `dataset_path` is a
`datasets` builder for local files (json, csv, text, parquet, arrow) reads its data from
`dataset_kwargs.data_files` and needs no network; any other `dataset_path` is a Hugging Face hub
dataset, and is refused with one line when the hub is offline or unreachable.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Sequence

from .errors import CmoeError

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas"}


class TaskError(CmoeError):
    """An lm-eval task that cannot be found or whose data cannot be had."""


def task_manager(include_path: Sequence[str | Path] | None = None, tasks: Sequence[str] = ()):
    """An lm-eval TaskManager. Indexing lm-eval's own task folders takes about 20 s on 2 cores;
    when every task in `tasks` is a YAML path or defined under `include_path`, only those are
    indexed."""
    from .evaluate import require_lm_eval

    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [Path(p).expanduser() for p in include_path or []]
    for path in paths:
        if not path.is_dir():
            raise TaskError(f"--include-path {path} is not a directory: pass a folder of task YAMLs")
    if tasks:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(_entry(local, spec) is not None for spec in tasks):
            return local
    return TaskManager(include_path=[str(p) for p in paths] or None)


def _entry(manager, spec: str):
    from lm_eval.tasks._index import TaskIndex

    entry = manager.task_index.get(spec)
    if entry is None and spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        entry = TaskIndex.entry_from_path(Path(spec))
    return entry


def _dataset_path(entry) -> str | None:
    """The task's dataset_path, includes resolved; None where it cannot be told (groups)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = entry.cfg or {}
    if entry.yaml_path is not None:
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=False)
        except Exception:  # noqa: BLE001 - lm-eval reports a broken YAML itself when it loads it
            return cfg.get("dataset_path")
    return cfg.get("dataset_path")


def needs_hub(dataset_path: str | None) -> bool:
    if dataset_path is None or dataset_path in LOCAL_BUILDERS:
        return False
    return not Path(dataset_path).expanduser().exists()  # a local dataset folder needs no hub


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Every task exists, and none needs the hub where the hub cannot be reached."""
    from .data import _hub_offline, _hub_unreachable

    for spec in tasks:
        entry = _entry(manager, spec)
        if entry is None:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TaskError(
                f"unknown lm-eval task {spec!r}{hint}: pass a registered name, a task YAML file, "
                "or --include-path DIR holding the task's YAML"
            )
        dataset = _dataset_path(entry)
        if not needs_hub(dataset):
            continue
        why = _hub_offline()
        why = f"{why} is set" if why else _hub_unreachable()
        if why:
            raise TaskError(
                f"lm-eval task {spec!r} needs the Hugging Face hub dataset {dataset}, and the hub "
                f"cannot be reached ({why}): run where it can, or write a local task whose "
                "dataset_path is json/csv/text with data_files (see README, `cmoe eval --tasks`)"
            )


def load_tasks(manager, tasks: Sequence[str]) -> list:
    """The tasks as lm-eval objects, built (their data read) now rather than after the model
    has loaded; a failure in lm-eval or datasets becomes one line."""
    check_tasks(manager, tasks)
    try:
        loaded = manager.load(list(tasks))
    except Exception as err:  # noqa: BLE001 - datasets/lm-eval raise many types for bad data
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(
            f"lm-eval could not load task(s) {', '.join(tasks)}: {type(err).__name__}: {first} "
            "(check the task YAML and its data_files)"
        ) from None
    if loaded["groups"]:
        return list(tasks)  # groups aggregate their children: let lm-eval build them again
    return list(loaded["tasks"].values())
