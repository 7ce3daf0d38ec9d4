"""MkDocs hook: the reference pages are generated from the code at every build.

A page asks for a generated part with a marker line such as ``<!-- generate: metrics -->``;
:func:`on_page_markdown` replaces the marker with Markdown built from

- ``metrics``: the metric catalog (:mod:`sic_core.metric_catalog`);
- ``site-config``: the site YAML's pydantic models (:mod:`client.config`);
- ``run-config``: the run settings (:mod:`server.settings`) and the defaults in
  ``pyproject.toml``'s ``[tool.flwr.app.config]``;
- ``cli-client`` / ``cli-server``: the typer apps of ``python -m client`` and
  ``python -m server``, walked through click.

Nothing is written to ``docs/``: the generated text exists only in the built site, so it
cannot go stale. ``tests/test_docs.py`` builds the site with ``--strict``.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

MARKER = re.compile(r"^<!-- generate: ([a-z-]+) -->$", re.MULTILINE)


def on_config(config: Any) -> Any:
    """Make the project's packages importable (MkDocs restores ``sys.path`` after loading)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace every generation marker of a page with its generated Markdown."""
    return MARKER.sub(lambda match: GENERATORS[match.group(1)](), markdown)


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell (Sphinx roles such as :mod: dropped)."""
    text = re.sub(r":[a-z]+:`", "`", str(text))
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: object) -> str:
    return f"`{text}`" if "`" not in str(text) else f"``{text}``"


# ----------------------------------------------------------------------------- metrics

_FAMILIES = (
    ("perf", "Performance (`perf/*`)"),
    ("xai", "Explanation quality (`xai/*`)"),
    ("why", "Why similar (`why/*`)"),
    ("flag", "Outlier flags (`flag/*`)"),
    ("dp", "Privacy (`dp/*`)"),
    ("data", "Data (`data/*`)"),
    ("support", "Support set (`support/*`)"),
    ("train", "Local training (`train/*`)"),
    ("fed", "Federation bookkeeping (`fed/*`)"),
    ("time", "Time (`time/*`)"),
    ("wire", "Sent by a site but not logged"),
)


def metrics_reference() -> str:
    """Every catalog entry, grouped by key family: a summary table, then one entry each."""
    from sic_core.metric_catalog import METRICS, metric_anchor

    parts = []
    for family, title in _FAMILIES:
        members = [m for m in METRICS if m.family == family]
        if not members:
            continue
        parts.append(f"## {title} {{#family-{family}}}\n")
        parts.append("| key | name | where | direction | threshold / flag |\n|---|---|---|---|---|")
        for m in members:
            rule = m.rule() + (f" → {_code(m.flag)}" if m.flag else "")
            parts.append(
                f"| [{_code(m.key)}](#{metric_anchor(m.key)}) | {_cell(m.name)} | "
                f"{m.scope} | {m.direction} | {_cell(rule) or '—'} |"
            )
        parts.append("")
        for m in members:
            wire = (
                f"{_code(m.wire_key)} in the site's {_code(m.phase)} reply"
                if m.wire_key
                else "computed by the server"
            )
            rows = [
                ("Meaning", m.meaning),
                ("Formula", m.formula),
                ("Range", m.value_range),
                ("Direction", str(m.direction)),
                ("Threshold", m.rule() or "none"),
                ("Flag", _code(m.flag) if m.flag else "none"),
                ("Logged in", f"the {m.scope}"),
                ("Sent as", wire),
                ("When out of range", m.action),
            ]
            parts.append(f"### {_code(m.key)} {{#{metric_anchor(m.key)}}}\n")
            parts.append(f"**{m.name}**\n")
            parts.append("| | |\n|---|---|")
            parts.extend(f"| {label} | {_cell(text)} |" for label, text in rows)
            parts.append("")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- pydantic


def _type_name(annotation: Any) -> str:
    """A pydantic field's annotation in words (``path or null``, ``list of text``)."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base = args[0]
        return "path" if base is Path else _type_name(base)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return "one of " + ", ".join(_code(member.value) for member in annotation)
        if issubclass(annotation, BaseModel):
            return "section"
        return {
            bool: "boolean",
            int: "integer",
            float: "number",
            str: "text",
            Path: "path",
        }.get(annotation, annotation.__name__)
    return str(annotation)


def _constraints(field: Any) -> str:
    words = []
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least", "pattern": ""}
    for item in field.metadata:
        for attribute, symbol in symbols.items():
            value = getattr(item, attribute, None)
            if value is None:
                continue
            if attribute == "pattern":
                words.append(f"matches {_code(value)}")
            elif attribute == "min_length":
                words.append(f"at least {value} items")
            else:
                words.append(f"{symbol} {value}")
    return ", ".join(words)


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, enum.Enum):
        return _code(value.value)
    if isinstance(value, tuple):
        return _code(list(value))
    return _code(value)


def _sections(model: type, prefix: str) -> Iterator[tuple[str, type]]:
    """``(dotted prefix, model)`` for ``model`` and every section nested in it."""
    from pydantic import BaseModel

    yield prefix, model
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _sections(annotation, f"{prefix}{name}.")


def site_config_reference() -> str:
    """One table per section of the site YAML: field, type, default, constraints, meaning."""
    from pydantic import BaseModel

    from client.config import SiteConfig

    parts = []
    for prefix, model in _sections(SiteConfig, ""):
        title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
        summary = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        summary = summary.replace("``", "`")
        parts.append(f"## {title} {{#{(prefix.rstrip('.') or 'top-level')}}}\n")
        parts.append(f"{summary}\n")
        parts.append("| field | type | default | allowed | what it does |\n|---|---|---|---|---|")
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            what = field.description or ""
            if nested:
                what = f"section: see [`{prefix}{name}`](#{prefix.replace('.', '')}{name})"
            parts.append(
                f"| {_code(prefix + name)} | {_cell(_type_name(annotation))} | "
                f"{'—' if nested else _cell(_default(field))} | {_cell(_constraints(field))} | "
                f"{_cell(what)} |"
            )
        parts.append("")
    return "\n".join(parts)


def _attribute_docs(model: type) -> dict[str, str]:
    """Field name -> text, from the numpy ``Attributes`` section of a class docstring.

    A group entry (``local_epochs, lr, batch_size``) gives its text to every name in it.
    """
    doc = inspect.cleandoc(model.__doc__ or "")
    if "Attributes\n----------\n" not in doc:
        return {}
    body = doc.split("Attributes\n----------\n", 1)[1]
    found: dict[str, str] = {}
    names: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        text = " ".join(line.strip() for line in lines).strip()
        if len(names) > 1:  # one entry describes several keys: say which
            text += " (one entry for " + ", ".join(names) + ")"
        for name in names:
            found[name] = text

    for line in body.splitlines():
        if line and not line.startswith(" "):
            flush()
            names, lines = [n.strip() for n in line.split(",")], []
        else:
            lines.append(line)
    flush()
    return found


def run_config_reference() -> str:
    """Every run-config key: type, the default ``flwr run`` sends, constraints, meaning."""
    from server.settings import RunSettings

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    described = _attribute_docs(RunSettings)
    rows = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for name, field in RunSettings.model_fields.items():
        key = field.alias or name
        default = defaults.get(key, "")
        shown = _code(json.dumps(default))
        text = described.get(name, "").replace("``", "`")
        # The docstring names fields in Python; the reader writes run-config keys.
        for python_name in sorted(RunSettings.model_fields, key=len, reverse=True):
            alias = RunSettings.model_fields[python_name].alias or python_name
            text = re.sub(rf"\b{python_name}\b", alias, text)
        rows.append(
            f"| {_code(key)} | {_type_name(field.annotation)} | {_cell(shown)} | "
            f"{_cell(_constraints(field))} | {_cell(text)} |"
        )
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- CLI


_RICH_TAG = re.compile(r"\[/?(?:bold|b|italic|i|dim|red|green|yellow|cyan|code)\]")


def _commands_block(body: str) -> str:
    """Indented example lines as one bash block; a line that does not start a command
    continues the one before it (help texts wrap long commands)."""
    commands: list[str] = []
    for line in textwrap.dedent(body).splitlines():
        line = line.strip()
        if not line:
            continue
        if commands and not line.startswith(("python", "make", "docker", "#", "flwr")):
            commands[-1] += " \\\n    " + line
        else:
            commands.append(line)
    return "```bash\n" + "\n".join(commands) + "\n```"


def _help_markdown(text: str) -> str:
    """A command's help as Markdown: numpy ``Examples`` sections and rich ``[bold]Examples``
    headings followed by indented lines become bash blocks."""
    text = inspect.cleandoc(text or "").replace("\b\n", "")
    text = re.sub(r"\[bold\]([^\[]+)\[/bold\]\n", r"\1\n---\n", text)
    text = _RICH_TAG.sub("", text)
    out: list[str] = []
    blocks = re.split(r"\n(?=[A-Z][A-Za-z ]+\n-{3,}\n)", text)
    for block in blocks:
        match = re.match(r"([A-Z][A-Za-z ]+)\n-{3,}\n(.*)", block, re.DOTALL)
        if match is None:
            out.append(block)
            continue
        title, body = match.groups()
        if title.strip() == "Examples":
            out.append(f"**Examples**\n\n{_commands_block(body)}")
        else:
            out.append(f"**{title.strip()}**\n\n{textwrap.dedent(body).strip()}")
    return "\n\n".join(out)


def _param_row(param: Any) -> str:
    import click

    if isinstance(param, click.Argument):
        names = param.human_readable_name
        kind = "argument"
    else:
        names = ", ".join(_code(o) for o in (*param.opts, *getattr(param, "secondary_opts", [])))
        kind = "flag" if getattr(param, "is_flag", False) else "option"
    type_name = param.type.name
    if isinstance(param.type, click.Choice):
        type_name = "one of " + ", ".join(_code(c) for c in param.type.choices)
    if getattr(param, "multiple", False):
        type_name += ", repeatable"
    default = param.default
    if param.required:
        shown = "**required**"
    elif default is None or default == () or callable(default):
        shown = "—"
    elif isinstance(default, bool):
        on = param.opts[0] if default else (param.secondary_opts or ["off"])[0]
        shown = _code(on)
    else:
        shown = _code(default)
    help_text = getattr(param, "help", None) or ""
    if isinstance(param, click.Argument):
        names = _code(names)
    return f"| {names} | {kind}, {_cell(type_name)} | {_cell(shown)} | {_cell(help_text)} |"


def _commands(group: Any, prog: str) -> Iterator[tuple[str, Any]]:
    import click

    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        path = f"{prog} {name}"
        if isinstance(command, click.Group):
            yield path, command
            yield from _commands(command, path)
        else:
            yield path, command


def cli_reference(module: str, prog: str) -> Callable[[], str]:
    """A generator for one CLI: its overview, then every command with usage and options."""

    def generate() -> str:
        import importlib

        import click
        import typer.main

        app = importlib.import_module(module).app
        root = typer.main.get_command(app)
        parts = [_help_markdown(root.help or ""), ""]
        root_options = [p for p in root.params if not p.hidden and p.name != "help"]
        if root_options:
            parts.append(f"Options of `{prog}` itself (before the command):\n")
            parts.append("| option | kind | default | what it does |\n|---|---|---|---|")
            parts.extend(_param_row(p) for p in root_options)
            parts.append("")
        commands = list(_commands(root, prog))
        parts.append("| command | what it does |\n|---|---|")
        for path, command in commands:
            anchor = path.removeprefix(prog).strip().replace(" ", "-")
            parts.append(f"| [`{path}`](#{anchor}) | {_cell(command.get_short_help_str(120))} |")
        parts.append("")
        for path, command in commands:
            anchor = path.removeprefix(prog).strip().replace(" ", "-")
            parts.append(f"## `{path}` {{#{anchor}}}\n")
            parts.append(_help_markdown(command.help or ""))
            if isinstance(command, click.Group):
                parts.append("")
                continue
            context = click.Context(command, info_name=path)
            usage = " ".join(command.collect_usage_pieces(context))
            parts.append(f"\n```text\n{path} {usage}\n```\n")
            params = [p for p in command.params if not getattr(p, "hidden", False)]
            if params:
                parts.append("| name | kind | default | what it does |\n|---|---|---|---|")
                parts.extend(_param_row(p) for p in params)
            parts.append("")
        return "\n".join(parts)

    return generate


GENERATORS: dict[str, Callable[[], str]] = {
    "metrics": metrics_reference,
    "site-config": site_config_reference,
    "run-config": run_config_reference,
    "cli-client": cli_reference("client.cli", "python -m client"),
    "cli-server": cli_reference("server.cli", "python -m server"),
}
