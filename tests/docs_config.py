"""The settings table of ``docs/configuration.md``, generated from the settings classes.

Every ``LLAMAS_`` setting is a field of a pydantic-settings class: the
``BaseSettings`` subclasses defined in ``SETTINGS_MODULES``. This module
builds one markdown table of them (variable, type and bounds, default, the
class that declares it, its ``Field(description=...)``), reading nothing but
the classes: no environment, no settings instance.

``python -m tests.docs_config`` (``make docs``) writes the table between the
markers ``<!-- settings:begin -->`` and ``<!-- settings:end -->`` of
``docs/configuration.md``; ``tests/test_docs.py`` fails when the file and the
classes disagree, or when a field has no description.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import AliasChoices, AliasPath
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"
#: The packages whose settings the table covers, and the modules that define them.
PACKAGES = ("llama_tasks", "router", "agent")
SETTINGS_MODULES = ("llama_tasks.settings", "router.core.settings", "agent.settings")
#: A "<" that markdown would read as the start of an HTML tag (``<home>``), not a comparison.
TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
#: What the description cell says for a field with no ``description=``.
MISSING = "**(no description)**"


@dataclass(frozen=True)
class Setting:
    """One field of one settings class, as the table shows it."""

    owner: str  # the class that declares the field
    field: str
    variable: str
    type: str
    default: str
    description: str | None


def settings_classes() -> list[type[BaseSettings]]:
    """Every ``BaseSettings`` subclass defined in ``SETTINGS_MODULES``, in module and source order."""
    found: list[type[BaseSettings]] = []
    for name in SETTINGS_MODULES:
        module = importlib.import_module(name)
        found += [obj for obj in vars(module).values()
                  if inspect.isclass(obj) and issubclass(obj, BaseSettings) and obj is not BaseSettings
                  and obj.__module__ == name]
    return found


def _variables(cls: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set ``field``: its alias, else the class's prefix and its name."""
    alias = field.validation_alias if field.validation_alias is not None else field.alias
    if alias is None:
        return [f"{cls.model_config.get('env_prefix', '')}{name}".upper()]
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    names = [c.upper() for c in choices if isinstance(c, str)]
    names += [str(c.path[0]).upper() for c in choices if isinstance(c, AliasPath) and c.path]
    return names


def _type_name(annotation: Any) -> str:
    if annotation is NoneType or annotation is None:
        return "None"
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(v) if isinstance(v, str) else repr(v) for v in get_args(annotation))
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        return f"{_type_name(origin)}[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    low = high = None
    min_len = max_len = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"≥ {item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"≤ {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f"< {item.lt}"
        elif isinstance(item, annotated_types.MinLen):
            min_len = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            max_len = item.max_length
    parts = [b for b in (low, high) if b]
    if min_len is not None and max_len is not None:
        parts.append(f"{min_len} to {max_len} characters")
    elif min_len is not None:
        parts.append(f"at least {min_len} character{'s' * (min_len != 1)}")
    elif max_len is not None:
        parts.append(f"at most {max_len} characters")
    return ", ".join(parts)


def _home_relative(path: Path) -> str:
    """A path as the table shows it: under the user's home directory as ``~/…``, so no machine's home is written."""
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is not None:
        if getattr(field, "default_factory_takes_data", False):
            return "(computed from the other fields)"
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        return f"`{_home_relative(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float, Decimal)):
        return f"`{value}`"
    if isinstance(value, str):
        plain = value and value.strip() == value and json.dumps(value)[1:-1] == value
        return f"`{value if plain else json.dumps(value)}`"
    return f"`{value!r}`"


def settings() -> list[Setting]:
    """Every field of every settings class, where it is declared (inherited fields are not repeated)."""
    rows: list[Setting] = []
    for cls in settings_classes():
        own = inspect.get_annotations(cls)
        for name, field in cls.model_fields.items():
            if name not in own:
                continue
            type_name = f"`{_type_name(field.annotation)}`"
            bounds = _bounds(field)
            rows.append(Setting(
                owner=cls.__name__,
                field=name,
                variable=" or ".join(f"`{v}`" for v in _variables(cls, name, field)),
                type=f"{type_name}, {bounds}" if bounds else type_name,
                default=_default(field),
                description=(field.description or "").strip() or None,
            ))
    return rows


def missing_descriptions() -> list[str]:
    """``Class.field`` of every field declared without a description."""
    return [f"{s.owner}.{s.field}" for s in settings() if s.description is None]


def _cell(text: str) -> str:
    """``text`` as one table cell: on one line, pipes escaped, and ``<home>`` outside code not read as HTML."""
    parts = " ".join(text.split()).split("`")
    # Even parts are prose, odd ones code spans (where markdown shows a tag as it is).
    parts[::2] = [TAG_START.sub("&lt;", p) for p in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def table() -> str:
    """The markdown table: one row per variable, the classes that declare it listed together."""
    merged: dict[str, list[Setting]] = {}
    for s in settings():
        merged.setdefault(s.variable, []).append(s)
    lines = ["| variable | type | default | declared in | description |", "|---|---|---|---|---|"]
    for variable, declared in merged.items():
        # Where classes declare one variable differently, every declaration's value is shown.
        type_text = _differing(declared, lambda s: s.type)
        default_text = _differing(declared, lambda s: s.default)
        description = next((s.description for s in declared if s.description), None) or MISSING
        owners = ", ".join(f"`{s.owner}`" for s in declared)
        lines.append("| " + " | ".join(_cell(c) for c in (
            variable, type_text, default_text, owners, description)) + " |")
    return "\n".join(lines) + "\n"


def _differing(declared: list[Setting], value: Any) -> str:
    values = [value(s) for s in declared]
    if len(set(values)) == 1:
        return values[0]
    return "; ".join(f"{v} ({s.owner})" for s, v in zip(declared, values))


def render(text: str) -> str:
    """``text`` with the table between the markers replaced by the generated one."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{DOC.relative_to(ROOT)} lacks the markers {BEGIN} … {END}")
    return text[: start + len(BEGIN)] + "\n" + table() + text[end:]


def current_table(text: str) -> str:
    """What the file holds between the markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{DOC.relative_to(ROOT)} lacks the markers {BEGIN} … {END}")
    return text[start + len(BEGIN): end].strip("\n") + "\n"


def main() -> int:
    text = DOC.read_text()
    new = render(text)
    name = DOC.relative_to(ROOT)
    if new == text:
        print(f"{name}: the settings table is up to date")
    else:
        DOC.write_text(new)
        print(f"{name}: rewrote the settings table ({len(settings())} fields)")
    missing = missing_descriptions()
    if missing:
        print(f"fields without a description (add Field(description=...)): {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
