"""Reading the YAML files users give dfka (experiment, amalgamation, benchmark and teacher-zoo configs).

One loader for all of them, so every file gets the same limits: a size cap, UTF-8 text, PyYAML's safe
constructors only, a cap on alias uses (a "billion laughs" file expands a few anchors into billions of
nodes for whatever walks the result), a nesting limit, and a mapping at the top. Each refusal is a
:class:`~dfka.errors.ConfigError` naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dfka.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_DEPTH = 50
MAX_NODES = 100_000  # after alias expansion: what a validator or a printer would walk


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts alias uses and nesting while composing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(
                    f"uses more than {MAX_ALIASES} YAML aliases (*name)", "write the values out in full"
                )
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels", "a dfka config is a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the tree ``node`` stands for once every alias is expanded (shared nodes counted per use,
    each distinct node computed once), capped just past ``MAX_NODES``."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a self-referencing anchor must not recurse forever
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
        else:
            total = 1
        memo[key] = min(total, MAX_NODES + 1)
    return memo[key]


class _Refused(Exception):
    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix


def parse_yaml(text: str, where: str = "config") -> Any:
    """``text`` parsed with the limits above; ``where`` names it in errors."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes", "is this really a dfka config?")
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_size(node, {})
        if size > MAX_NODES:
            raise _Refused(
                f"expands to more than {MAX_NODES:,} values through its YAML aliases",
                "write the values out instead of nesting anchors",
            )
        return loader.construct_document(node)
    except _Refused as err:
        raise ConfigError(f"{where} {err.problem}", err.fix) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}", "fix the syntax") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, *, mapping: bool = True, what: str = "config file") -> Any:
    """A user's YAML file; with ``mapping`` (the default) it must hold key: value pairs (empty = ``{}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} not found", "check the path (configs/ holds the examples)")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p} is larger than {MAX_CONFIG_BYTES} bytes", "is this really a dfka config?")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8 text", "save the file as UTF-8 YAML") from None
    except OSError as err:
        raise ConfigError(f"cannot read {p}: {err.strerror}", "check the file's permissions") from None
    data = parse_yaml(text, str(p))
    if mapping:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p} holds a YAML {type(data).__name__}, not a mapping of keys to values",
                "write the config as `key: value` lines (see configs/ for examples)",
            )
    return data
