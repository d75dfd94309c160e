"""Task registrations: where a task's callable lives, how to import it and which form it has."""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

ENTRY_POINT_GROUP = "task_runner.tasks"
CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect


class Form(enum.Enum):
    """How a task gives its answer."""

    SYNC = "sync"  # def task(options) -> bool | tuple[bool, dict]
    ASYNC = "async"  # async def task(options) -> bool | tuple[bool, dict]
    CALLBACK = "callback"  # def task(options, callback): callback(err) or callback(None, outcome, result)


class Loaded(NamedTuple):
    """A task's callable, imported, with its form and one-line description."""

    function: Callable[..., Any]
    form: Form
    description: str


def parse_target(target: str) -> tuple[str, str]:
    """Split "package.module:function" into its module and attribute path.

    Raises:
        ValueError: if `target` is not of that form.
    """
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"task target {target!r} is not of the form 'package.module:function'")
    return module, attr


def load(target: str) -> Loaded:
    """Import a task's callable. Any exception raised by the task's module propagates."""
    module_name, attr = parse_target(target)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"task target {target!r} is not callable")
    return Loaded(function=obj, form=form_of(obj), description=_first_line(getattr(obj, "__doc__", None)))


def form_of(function: Callable[..., Any]) -> Form:
    """Tell the form from the signature: a coroutine function, or one taking (options, callback)."""
    code = getattr(function, "__code__", None)
    if code is not None and not hasattr(function, "__self__"):  # a plain function: no need for inspect
        if code.co_flags & CO_COROUTINE:
            return Form.ASYNC
        return Form.CALLBACK if code.co_argcount >= 2 else Form.SYNC
    import inspect  # heavy: kept out of the fork server unless a task needs it

    if inspect.iscoroutinefunction(function):
        return Form.ASYNC
    try:
        params = [
            p for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # builtins without a signature
        return Form.SYNC
    return Form.CALLBACK if len(params) >= 2 else Form.SYNC


def _first_line(doc: Any) -> str:
    return doc.strip().splitlines()[0].strip() if isinstance(doc, str) and doc.strip() else ""


def installed_tasks() -> dict[str, str]:
    """Tasks registered by installed packages under the `task_runner.tasks` entry-point group."""
    from importlib.metadata import entry_points  # heavy: kept out of the fork server

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
