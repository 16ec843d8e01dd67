"""Every task defined in tasks.py is reachable: the collection is written out by hand, and a task
missing from it answers "No idea what 'NAME' is!"."""

import importlib.util
from pathlib import Path

from invoke import Task

ROOT = Path(__file__).resolve().parents[2]


def test_every_task_is_in_the_collection():
    spec = importlib.util.spec_from_file_location("llm2wasm_tasks", ROOT / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    defined = {task.name.replace("_", "-") for task in vars(tasks).values() if isinstance(task, Task)}
    assert defined == set(tasks.ns.task_names), defined ^ set(tasks.ns.task_names)
