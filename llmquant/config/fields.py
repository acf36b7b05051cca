"""Type checks for the frozen config dataclasses, driven by their annotations.

Every config object (recipe sections, option objects) checks each field against its type hint
here, so a new field is checked the moment it is declared. A wrong type is reported with the
field's path, the type expected, the valid values when the field has a fixed set (declared as
`field(metadata={"choices": ...})`), and what was given:

    quantize.weights.num_bits must be an integer, one of 4, 8; got the string "4".

Only types are checked here; ranges and combinations stay in each class's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, Union

from llmquant.errors import InvalidConfigError

CHOICES = "choices"  # field metadata key: the valid values, named in the message
EXPECTED = "expected"  # field metadata key: what the field takes, in words, where its type says too little


def reject_unknown_keys(data: dict, valid, where: str) -> None:
    """Raise InvalidConfigError naming the unknown keys and the valid ones."""
    unknown = sorted(set(data) - set(valid), key=str)
    if unknown:
        raise InvalidConfigError(
            f"Unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
            f"valid keys: {', '.join(sorted(valid))}."
        )


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def accepts(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` names (bool is not an integer; an int is a number)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(accepts(value, a) for a in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(accepts(v, item) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def expected(hint: Any) -> str:
    """`hint` in words: "an integer", "a number or null", "a list of strings"."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        words = [expected(a) for a in args if a is not type(None)]
        text = " or ".join(words)
        return text + " or null" if type(None) in args else text
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is tuple:
        return f"a list of {expected(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def describe_value(value: Any) -> str:
    """A value as a YAML writer would recognize it: the string "4", the list [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f'the string "{value}"'
    if isinstance(value, (list, tuple)):
        return f"the list {list(value)!r}"
    if isinstance(value, dict):
        return f"the mapping {value!r}"
    return f"a {type(value).__name__}"


def type_error(where: str, hint: Any, value: Any, choices=None, words: str | None = None) -> InvalidConfigError:
    valid = f", one of {', '.join(map(str, choices))}" if choices else ""
    return InvalidConfigError(f"{where} must be {words or expected(hint)}{valid}; got {describe_value(value)}.")


def check_value(where: str, value: Any, hint: Any, choices=None, words: str | None = None) -> None:
    if not accepts(value, hint):
        raise type_error(where, hint, value, choices, words)


def check_fields(obj: Any, where: str, paths: dict[str, str] | None = None) -> None:
    """Check every field of the dataclass instance `obj`; `where` prefixes the field names
    (`paths` gives a field another name, e.g. the recipe's `targets` is `quantize.targets`)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        name = (paths or {}).get(f.name) or (f"{where}.{f.name}" if where else f.name)
        check_value(name, getattr(obj, f.name), hints[f.name], f.metadata.get(CHOICES), f.metadata.get(EXPECTED))


def check_mapping(cls: type, data: Any, where: str, example: str | None = None) -> dict:
    """Check a raw mapping (from YAML or keyword arguments) against the fields of `cls`: it is a
    mapping, has no unknown key, and each value has its field's type. Returns it as a dict."""
    if not isinstance(data, dict):
        such = f" such as {example}" if example else ""
        raise InvalidConfigError(f"{where} must be a mapping{such}; got {describe_value(data)}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown_keys(data, fields, where)
    hints = _hints(cls)
    for key, value in data.items():
        meta = fields[key].metadata
        check_value(f"{where}.{key}", value, hints[key], meta.get(CHOICES), meta.get(EXPECTED))
    return dict(data)


def choices(values) -> dict:
    """`field(metadata=choices(...))`: the valid values a type error names."""
    return {CHOICES: tuple(values)}


def described(words: str) -> dict:
    """`field(metadata=described("'auto' or a number from 0 to 1"))`: the expected value in words."""
    return {EXPECTED: words}
