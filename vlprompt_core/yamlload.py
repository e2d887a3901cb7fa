"""Reading YAML as vlprompt does everywhere (run specs, sweep files, dataset spec
files, dataset descriptions, recipes, published numbers): :func:`load` is
``yaml.safe_load`` that refuses a key given twice in one mapping. YAML forbids it;
PyYAML keeps the last one silently, so a second ``train:`` would drop the first
one's settings. Keys merged in with ``<<: *anchor`` may still be overridden, as YAML
allows. :func:`yaml_problem` says what is wrong with a file in one line."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "UniqueKeyLoader", "load", "yaml_problem"]

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (a :class:`yaml.YAMLError`, marked with the line
    of the second)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """:class:`yaml.SafeLoader` refusing a key given twice in one mapping, at any depth."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: PyYAML says so itself
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(
                        None, None, f"the key {key!r} appears twice (first on line {first.start_mark.line + 1}): "
                        "keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    """The data of a YAML document, as ``yaml.safe_load`` reads it, a key given twice in
    one mapping refused (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where, and what (``while parsing ..., expected ...``)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    what = ", ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None))))
    return f"{where}invalid YAML ({what or str(exc).strip().splitlines()[0]})"
