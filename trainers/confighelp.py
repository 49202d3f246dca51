"""`viewpipe pretrain --help-config`: every key of the schema (`trainers/schema.py`) on one line, with its type,
default and meaning, and the range or choices `validate` holds it to; a section met before is referred to,
not listed again. `method_args` are listed per method from its constructor: the signature's types and defaults,
the meanings of its docstring's `Args:` section."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing

from viewpipe.trainers.schema import TrainConfig, choices_of, cpu_cores
from viewpipe.trainers.validation import describe_range, join_key, type_name


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return ""
        if f.default_factory is cpu_cores:
            return f"{value} (the cores here)"
    else:
        value = f.default
    return _value_text(value)


def _value_text(value: object) -> str:
    """A default as YAML would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:.6g}" if isinstance(v, float) else json.dumps(v) for v in value) + "]"
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(value)


def _constraint(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return "one of " + ", ".join(choices_of(f))
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        if lo is None and hi is None:
            return ""
        lo_open, hi_open = f.metadata["open"]
        return describe_range(lo, hi, lo_open, hi_open, f.metadata.get("integer", False)) + (
            ", min <= max" if f.metadata.get("ordered") else "")
    return ""


def describe(cls: type = TrainConfig) -> list[tuple[str, str, str, str]]:
    """Every key of the config: (key, type, default, help with its allowed values). A section seen before is
    referred to rather than listed again; list items are written `key[]`."""
    rows: list[tuple[str, str, str, str]] = []
    seen: dict[type, str] = {}

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            key, tp = join_key(prefix, f.name), hints[f.name]
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            sub = tp if dataclasses.is_dataclass(tp) else item if dataclasses.is_dataclass(item) else None
            text = f.metadata.get("help", "")
            limit = _constraint(f)
            text = f"{text} ({limit})" if limit else text
            if sub is not None:
                known = next((k for t, k in seen.items() if issubclass(t, sub)), None)
                if known is not None:
                    text += f"; the keys of {known}" if sub in seen else f"; the photometric keys of {known}"
                rows.append((key, type_name(tp), _default_text(f), text))
                if known is None:
                    seen[sub] = key
                    walk(sub, key + ("[]" if item is not None else ""))
            else:
                rows.append((key, type_name(tp), _default_text(f), text))

    walk(cls, "")
    return rows


def arg_meanings(doc: str) -> dict[str, str]:
    """The `name: meaning` entries of a docstring's `Args:` section (Google style; continuation lines indented
    deeper are joined)."""
    meanings: dict[str, str] = {}
    lines = doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []
    base, name = None, None
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        start = re.match(r"\s*(\w+): (.*)", line)
        if start and (base is None or indent == base):
            base, name = indent, start[1]
            meanings[name] = start[2].strip()
        elif name is not None and base is not None and indent > base:
            meanings[name] += " " + line.strip()
        else:
            break
    return meanings


def method_args_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every registered method's constructor arguments (after the backbone),
    `method_args.NAME` with the method named in the meaning."""
    from viewpipe.trainers.base import METHODS

    rows = []
    for method, cls in METHODS.items():
        meanings = arg_meanings(inspect.getdoc(cls.__init__) or "")
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, backbone
        for p in params:
            tp = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            rows.append((f"method_args.{p.name}", tp, _value_text(p.default), f"[{method}] {meanings.get(p.name, '')}"))
    return rows


def help_config() -> str:
    """`viewpipe pretrain --help-config`: every key, its type, default and meaning, one line each; the methods'
    arguments after `method_args`."""
    rows = describe()
    at = next(i for i, r in enumerate(rows) if r[0] == "method_args") + 1
    rows[at:at] = method_args_rows()
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in (0, 1, 2))
    lines = ["Config keys (YAML, or overrides KEY=VALUE; null: inherit, [] / {}: empty). A key's default "
             "comes from the defaults below, then the --config file, then the overrides.", "",
             f"{'KEY':<{w0}}  {'TYPE':<{w1}}  {'DEFAULT':<{w2}}  MEANING"]
    for key, tp, default, text in rows:
        lines.append(f"{key:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {text}".rstrip())
    return "\n".join(lines)
