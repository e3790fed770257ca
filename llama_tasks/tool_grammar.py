"""The GBNF grammar a tool call is sampled under, built from the functions' JSON schemas.

Every call is written ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
(``tool_prompt`` tells the model so); the grammar admits exactly the calls
whose name is an offered function and whose arguments match that function's
schema, so even a small model's call parses and validates. With
``tool_choice`` ``required`` or a named function the grammar holds from the
first token; with ``auto`` it is lazy: the model writes freely until it
writes ``<tool_call>`` (``TRIGGERS``), and from there on the grammar holds.
With ``parallel_tool_calls`` false it admits one call, otherwise calls
one right after another; after the last, only end-of-sequence.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

from llama_tasks.errors import BadTools
from llama_tasks.tools import CLOSE, OPEN, SEPARATOR

#: Most values of a bounded integer the grammar spells out one by one.
MAX_SPELLED_INTEGERS = 256
#: The lazy grammar's trigger patterns (std::regex, searched in the generated text).
TRIGGERS = [OPEN]


class _Converter(SchemaConverter):
    """llama-cpp-python's converter, with ``$ref`` rules named per reference.

    The original names a referenced definition's rule by the last part of
    its path, so two functions that each define ``#/$defs/Item`` would share
    the first one's rule; here each reference (its URL says which function)
    gets a rule of its own.
    """

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._ref_rules: dict[str, str] = {}

    def visit(self, schema: Any, name: str) -> Any:
        # The converter ignores an integer's bounds; a small range is spelled out here, so a call
        # sampled under the grammar respects them (a wider one is left to the parser's validation).
        values = _small_range(schema)
        if values is not None:
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, "(" + " | ".join(f'"{v}"' for v in values) + ") space")
        return super().visit(schema, name)

    def _resolve_ref(self, ref: str) -> str:
        name = self._ref_rules.get(ref)
        if name is None:
            # Named before it is visited, so a recursive definition refers to itself.
            name = self._ref_rules[ref] = f"ref{len(self._ref_rules)}"
            body = self.visit(self._refs[ref], name)
            if body != name:  # a primitive is answered with its shared rule: name it for the references
                self._add_rule(name, body)
        return name


def _small_range(schema: Any) -> range | None:
    """The values of an integer schema bounded on both sides by at most ``MAX_SPELLED_INTEGERS`` values."""
    if not isinstance(schema, dict) or schema.get("type") != "integer" or {"enum", "const", "$ref"} & set(schema):
        return None
    bounds = []
    for inclusive, exclusive, step in (("minimum", "exclusiveMinimum", 1), ("maximum", "exclusiveMaximum", -1)):
        values = [schema.get(inclusive)] + [schema.get(exclusive)]
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                   for v in values):
            return None
        found = [math.ceil(v) if step == 1 else math.floor(v) for v in values[:1] if v is not None]
        found += [math.floor(v) + 1 if step == 1 else math.ceil(v) - 1 for v in values[1:] if v is not None]
        if not found:
            return None
        bounds.append(max(found) if step == 1 else min(found))
    low, high = bounds
    return range(low, high + 1) if 0 <= high - low < MAX_SPELLED_INTEGERS else None


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def gbnf(functions: dict[str, dict[str, Any]], parallel: bool) -> str:
    """The grammar of one answer made of calls to ``functions`` (``{name: {"parameters": schema}}``).

    Raises ``BadTools`` for a schema the converter cannot express.
    """
    converter = _Converter()
    calls = []
    for i, (name, fn) in enumerate(functions.items()):
        try:
            # resolve_refs rewrites the schema it is given: work on a copy.
            parameters = converter.resolve_refs(copy.deepcopy(fn["parameters"]), f"tool{i}")
            call = {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"]}
            calls.append(converter.visit(call, f"call{i}"))
        except Exception as exc:  # the converter raises bare Exceptions (and asserts on some shapes)
            raise BadTools("tools", f"the parameters of {name!r} do not compile to a grammar: {exc}") from None
    converter._add_rule("call", " | ".join(calls))
    one = f"{_literal(OPEN)} call {_literal(CLOSE)}"
    more = f"{_literal(SEPARATOR)} {one}" if SEPARATOR else one
    converter._add_rule("root", f"{one} ({more})*" if parallel else one)
    return str(converter.format_grammar())
