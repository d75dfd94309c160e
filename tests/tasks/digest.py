"""A task that answers a digest of the options it received, so that a test can tell they arrived intact."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def options_sha256(options: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """sha256 of the options as canonical JSON (keys sorted), and how many top-level keys they hold."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return True, {"sha256": hashlib.sha256(text.encode()).hexdigest(), "keys": len(options)}
