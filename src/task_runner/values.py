"""JSON-like Python values <-> google.protobuf.Struct, shared by the client, the daemon and task processes.

Struct numbers are IEEE-754 doubles. To never round silently, `to_struct` refuses integers
beyond +-2^53 and non-finite floats; `from_struct` gives whole numbers within +-2^53 back as
`int`, so `{"n": 3}` round-trips as `{"n": 3}`, not `{"n": 3.0}`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.struct_pb2 import ListValue, Struct, Value

MAX_SAFE_INTEGER = 2**53
MAX_DEPTH = 64  # protobuf's parser stops at 100 nested messages; each level here costs 1-2


class NotJsonLike(ValueError):
    """A value that a Struct cannot carry exactly; the message names where it is."""


def to_struct(obj: Mapping[str, Any], into: Struct | None = None) -> Struct:
    """Convert a mapping of JSON-like values to a Struct.

    Args:
        obj: a mapping with str keys and values that are None, bool, int (within +-2^53),
            finite float, str, list/tuple or mapping of the same.
        into: an existing (empty) Struct to fill, e.g. a message field.

    Raises:
        NotJsonLike: naming the path of the first value that is not JSON-like.
    """
    struct = Struct() if into is None else into
    if not isinstance(obj, Mapping):
        raise NotJsonLike(f"expected a dict, got {type(obj).__name__}")
    _fill_struct(struct, obj, "", 0)
    return struct


def _fill_struct(struct: Struct, obj: Mapping[Any, Any], path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise NotJsonLike(f"{path or 'value'}: nested deeper than {MAX_DEPTH} levels")
    fields = struct.fields
    for key, item in obj.items():
        if not isinstance(key, str):
            raise NotJsonLike(f"{path or 'value'}: key {key!r} is not a string")
        _fill_value(fields[key], item, f"{path}[{key!r}]", depth + 1)


def _fill_list(lst: ListValue, obj: list[Any] | tuple[Any, ...], path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise NotJsonLike(f"{path}: nested deeper than {MAX_DEPTH} levels")
    for index, item in enumerate(obj):
        _fill_value(lst.values.add(), item, f"{path}[{index}]", depth + 1)


def _fill_value(value: Value, obj: Any, path: str, depth: int) -> None:
    if obj is None:
        value.null_value = 0  # type: ignore[assignment]
    elif obj is True or obj is False:
        value.bool_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, int):
        if not -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER:
            raise NotJsonLike(f"{path}: integer {obj} is beyond 2^53 and would be rounded; send it as a string")
        value.number_value = obj
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise NotJsonLike(f"{path}: {obj} is not a finite number")
        value.number_value = obj
    elif isinstance(obj, Mapping):
        value.struct_value.SetInParent()
        _fill_struct(value.struct_value, obj, path, depth)
    elif isinstance(obj, list | tuple):
        value.list_value.SetInParent()
        _fill_list(value.list_value, obj, path, depth)
    else:
        raise NotJsonLike(f"{path}: {type(obj).__name__} is not JSON-like")


def check_struct(struct: Struct, depth: int = 0) -> None:
    """Check a Struct from another language carries only finite numbers and bounded nesting.

    Raises:
        NotJsonLike: for NaN or infinity, or nesting deeper than MAX_DEPTH.
    """
    if depth > MAX_DEPTH:
        raise NotJsonLike(f"nested deeper than {MAX_DEPTH} levels")
    for key, value in struct.fields.items():
        _check_value(value, f"[{key!r}]", depth + 1)


def _check_value(value: Value, path: str, depth: int) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value" and not math.isfinite(value.number_value):
        raise NotJsonLike(f"{path}: {value.number_value} is not a finite number")
    if kind == "struct_value":
        if depth > MAX_DEPTH:
            raise NotJsonLike(f"{path}: nested deeper than {MAX_DEPTH} levels")
        for key, item in value.struct_value.fields.items():
            _check_value(item, f"{path}[{key!r}]", depth + 1)
    elif kind == "list_value":
        for index, item in enumerate(value.list_value.values):
            _check_value(item, f"{path}[{index}]", depth + 1)


def struct_digest(struct: Struct) -> bytes:
    """A digest of a Struct's values: the same however they were serialized (a serializer orders a map
    as it likes; Python's, differently in each process)."""
    digest: bytes = _SHA256(struct.SerializeToString(deterministic=True)).digest()
    return digest


def _sha256() -> Callable[[bytes], Any]:
    """SHA-256 from CPython's own small module, not hashlib's OpenSSL: every task process computes one, and the
    fork server would otherwise map all of libcrypto (4 MiB) that each of them pays for at fork and exit."""
    for name in ("_sha2", "_sha256"):  # (3.12 and later, 3.11)
        try:
            sha256: Callable[[bytes], Any] = importlib.import_module(name).sha256
        except (ImportError, AttributeError):
            continue
        return sha256
    import hashlib

    return hashlib.sha256


# Found once, at import (by the fork server, before it forks): a failed import costs a walk of sys.path, and
# OpenSSL's first digest in a process its lazy set-up, each far more than the digest of a small Struct.
_SHA256 = _sha256()


def from_struct(struct: Struct) -> dict[str, Any]:
    """Convert a Struct to a dict, whole numbers within +-2^53 as int.

    Raises:
        NotJsonLike: for NaN or infinity, or nesting deeper than MAX_DEPTH, naming where: a
            Struct from another language may carry them.
    """
    try:
        return _from_fields(struct, 0)
    except NotJsonLike:
        check_struct(struct)  # the slower walk that names where
        raise


def _from_fields(struct: Struct, depth: int) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise NotJsonLike(f"nested deeper than {MAX_DEPTH} levels")
    return {key: _from_value(value, depth + 1) for key, value in struct.fields.items()}


def _from_value(value: Value, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and -MAX_SAFE_INTEGER <= number <= MAX_SAFE_INTEGER:
            return int(number)
        if not math.isfinite(number):
            raise NotJsonLike(f"{number} is not a finite number")
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _from_fields(value.struct_value, depth)
    if kind == "list_value":
        return [_from_value(item, depth + 1) for item in value.list_value.values]
    return None
