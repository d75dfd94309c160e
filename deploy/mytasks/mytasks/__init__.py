"""A placeholder package of tasks: what the image's daemon serves until you install your own."""

from __future__ import annotations

from typing import Any


def hello(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Greet options["name"] (default "world"): a task is a function of its options, answering (outcome, result)."""
    return True, {"hello": options.get("name", "world")}
