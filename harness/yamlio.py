"""YAML as every keh file (hparams, grids, ``--set`` values) is read: PyYAML's safe loader,
except that a mapping with the same key twice is an error, not "the last value wins"
(``lr: 0.1`` ... ``lr: 1.0`` further down would silently change a run)."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError


class DuplicateKeyError(ConstructorError):
    """A mapping holds a key twice. A ``MarkedYAMLError``, so callers that report YAML
    errors (with ``problem`` and ``problem_mark``) name it, its line and the first one."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, Any] = {}  # key -> the mark of its first occurrence
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys it merges may
                continue  # be overridden here, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the safe loader's own error follows
                continue
            if seen is not key_node.start_mark:
                raise DuplicateKeyError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen.line + 1}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing duplicate mapping keys (:class:`DuplicateKeyError`,
    a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)
