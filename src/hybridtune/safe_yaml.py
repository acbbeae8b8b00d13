"""YAML for recipes and suites: PyYAML's SafeLoader, stricter in three ways.

- A key given twice in one mapping is refused (PyYAML keeps the last one silently, so a recipe
  with two `lr:` lines trained with whichever came last).
- At most `MAX_ALIASES` aliases (`*name`) per document, and at most `MAX_NODES` nodes once every
  alias is expanded: a "billion laughs" document (9 anchors of 9 aliases each: 81 aliases, 9⁹
  strings) is refused while it is still a small graph, instead of being built in memory for minutes
  (the attack: https://en.wikipedia.org/wiki/Billion_laughs_attack; PyYAML has no limit of its own,
  yaml/pyyaml#386).
- Nesting deeper than `MAX_DEPTH` is refused (the composer and constructor recurse per level).

Each refusal is a `yaml.YAMLError` with a `problem` and a `problem_mark`, so callers report it as
any other invalid YAML: `file:line: found invalid YAML (...)`.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

MAX_ALIASES = 100
MAX_NODES = 100_000  # a recipe has a few hundred at most
MAX_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys, alias bombs and very deep nesting."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"more than {MAX_ALIASES} aliases", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):  # noqa: ANN201
        node = super().compose_document()
        if node is not None and expanded_size(node) > MAX_NODES:
            raise ComposerError(
                None, None, f"more than {MAX_NODES} values, aliases expanded", node.start_mark
            )
        return node

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                    continue  # a complex key (SafeLoader refuses an unhashable one); `<<: *base`
                    # merges may repeat keys: the mapping's own ones win, as YAML says
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise ConstructorError(
                            None, None, f"the key '{str(key)[:80]}' twice in one mapping", key_node.start_mark
                        )
                    seen.add(key)
                except TypeError:  # unhashable: SafeLoader says so below
                    pass
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node) -> int:
    """Nodes in the document once every alias is expanded (an alias shares its anchor's node object,
    so the graph stays small while its expansion can be astronomically large). A cycle counts as
    infinite."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            return MAX_NODES + 1
        in_progress.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > MAX_NODES:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > MAX_NODES:
                    break
        in_progress.discard(key)
        sizes[key] = min(total, MAX_NODES + 1)
        return sizes[key]

    return size(node)


def load(text: str) -> Any:
    """`yaml.safe_load` with StrictLoader's limits."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
