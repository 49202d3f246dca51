"""Command-line overrides, `key=value`, each applied in turn over the config file. The key's steps index into
lists (`data.groups[1].size`, or `data.groups.1.size`): the list as it stands, with that entry changed,
replaces it. The value is read by OmegaConf's own grammar (the one its resolvers' arguments use), where a
colon needs no space after it (`{queue:1024}`, which YAML reads as one key) and `${...}` stays as written, to
be resolved once every layer is merged; each unquoted scalar in it is read as YAML reads a scalar (0.3, true,
null, text), and what the grammar cannot read (quoted keys, as JSON writes them) as YAML reads it. A list or
a mapping (method_args) given whole replaces what was there; a section merges key by key."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.schema import TrainConfig

# the grammar's tokens in a message, as the user types them
_TOKENS = {"COMMA": "','", "COLON": "':'", "BRACE_CLOSE": "'}'", "BRACKET_CLOSE": "']'"}


def _scalar(text: str) -> Any:
    """One value as YAML reads it (0.3, true, null, text); text YAML cannot read stays text."""
    import yaml

    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _reader() -> Any:
    """OmegaConf's grammar visitor, reading a scalar as YAML does and leaving `${...}` as written."""
    from omegaconf.grammar_visitor import GrammarVisitor

    class Reader(GrammarVisitor):
        def __init__(self) -> None:
            super().__init__(node_interpolation_callback=None, resolver_interpolation_callback=None, memo=None)

        def visitPrimitive(self, ctx: Any) -> Any:
            return _scalar(ctx.getText().strip())

        def visitDictKey(self, ctx: Any) -> str:
            return ctx.getText().strip()

        def visitInterpolation(self, ctx: Any) -> str:
            return ctx.getText()

    return Reader()


def _unreadable(text: str, exc: Exception) -> ViewpipeError:
    """The grammar's complaint about `text` in the user's terms (`expected ',' or '}' at the end`)."""
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    found, tokens = None, ""
    if m := re.fullmatch(r"mismatched input (.+) expecting \{?(.+?)\}?", why):
        found, tokens = m.groups()
    elif m := re.fullmatch(r"missing (\w+) at (.+)", why):
        tokens, found = m.groups()
    wanted = sorted(_TOKENS.get(t.strip(), "") for t in tokens.split(","))
    if found is not None and all(wanted):
        why = f"expected {' or '.join(wanted)} " + ("at the end" if found == "'<EOF>'" else f"at {found}")
    return ViewpipeError(f"cannot read {text!r}: {why}; e.g. {{queue: 1024, tau: 0.2}} or [0.2, 1.0]")


def parse_value(raw: str) -> Any:
    """An override's value: YAML scalars (0.3, true, null, text), and flow mappings and lists whose colons need
    no space (`{queue:1024, tau: 0.2}`, `[0.2, 1]`), nested; `${...}` interpolations kept for OmegaConf."""
    text = raw.strip()
    if text[:1] not in ("{", "["):
        return _scalar(raw)
    from omegaconf.errors import GrammarParseError
    from omegaconf.grammar_parser import parse

    try:
        return _reader().visit(parse(text, parser_rule="singleElement", lexer_mode="VALUE_MODE"))
    except GrammarParseError as exc:
        flow = _scalar(text)  # what the grammar cannot read, YAML's flow may: quoted keys (JSON), ~, `{a: }`
        if isinstance(flow, (dict, list)):
            return flow
        raise _unreadable(text, exc) from None


def key_path(key: str, item: str) -> list[str | int]:
    """An override's key as its steps: `data.groups[1].size` (or `data.groups.1.size`) is
    ["data", "groups", 1, "size"]."""
    steps: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        indices = rest[:-1].split("][") if rest else []
        if (not name and not (steps and indices)) or (rest and not rest.endswith("]")) \
                or any(not i.isdigit() for i in indices):
            raise ViewpipeError(f"override {item!r}: expected key=value, e.g. optim.lr=0.3 or "
                                f"data.groups[1].size=96")
        if name:
            steps.append(int(name) if name.isdigit() else name)
        steps += [int(i) for i in indices]
    return steps


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """`a.b.c=value` as its key's steps (`key_path`) and its value (`parse_value`)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ViewpipeError(f"override {item!r}: expected key=value, e.g. optim.lr=0.3")
    steps = key_path(key, item)
    if isinstance(steps[0], int):
        raise ViewpipeError(f"override {item!r}: a key starts with a name, e.g. data.groups[1].size=96")
    try:
        value = parse_value(raw)
    except ViewpipeError as exc:
        raise ViewpipeError(f"override {item}: {exc}") from None
    return steps, value


def _nest(steps: list[str], value: Any) -> dict:
    """{a: {b: {c: value}}} for steps [a, b, c]."""
    for step in reversed(steps):
        value = {step: value}
    return value


def _lists(value: Any) -> Any:
    """`value` with every tuple (OmegaConf's tuple fields) turned into a list, so that an entry can be set."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _set_in(container: Any, steps: list[str | int], value: Any, item: str, where: str) -> None:
    """`value` put at `steps` inside the plain `container` (lists and mappings); an index beyond a list is
    one line naming the override and the list's length."""
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(step, int):
            if not isinstance(container, list):
                raise ViewpipeError(f"override {item}: {where} is not a list")
            if step >= len(container):
                raise ViewpipeError(f"override {item}: {where} has {len(container)} entr"
                                    f"{'y' if len(container) == 1 else 'ies'} (indices from 0)"
                                    + (f"; give the whole list: {where}=[...]" if not container else ""))
        elif not isinstance(container, dict):
            raise ViewpipeError(f"override {item}: {where} is not a section or mapping")
        if last:
            container[step] = value
            return
        if isinstance(step, str) and container.get(step) is None:
            container[step] = {}
        container, where = container[step], f"{where}[{step}]" if isinstance(step, int) else f"{where}.{step}"


def _schema_type(key: str) -> Any:
    """The type the schema gives dotted `key` (Any inside a mapping such as method_args)."""
    tp: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return Any
        tp = typing.get_type_hints(tp)[part]
    return tp



def override_values(cfg: Any, steps: list[str | int], value: Any, item: str) -> tuple[str, dict]:
    """The override `item` (its key's `steps` and its `value`) as the dotted key it sets and the nested values
    to merge into the OmegaConf config `cfg`: into a list, the list as it stands with the entry changed."""
    from omegaconf import OmegaConf

    first = next((i for i, s in enumerate(steps) if isinstance(s, int)), len(steps))
    names = [str(s) for s in steps[:first]]
    if first < len(steps):
        current = OmegaConf.select(cfg, ".".join(names))
        if current is None:
            raise ViewpipeError(f"override {item}: {'.'.join(names)} is not a list (or is empty)")
        whole = _lists(OmegaConf.to_container(current) if OmegaConf.is_config(current) else current)
        _set_in(whole, steps[first:], value, item, ".".join(names))
        value = whole
    return ".".join(names), _nest(names, value)


def clear_replaced(cfg: Any, key: str) -> None:
    """Empty the list or mapping at `key` in `cfg` before an override's value is merged in, so that the value
    replaces it whole; a section is left to merge key by key."""
    from omegaconf import OmegaConf

    empty = {list: [], dict: {}}.get(typing.get_origin(_schema_type(key)))
    if empty is not None:
        OmegaConf.update(cfg, key, empty, merge=False)
