"""The one command-line grammar of ``python -m harness``: ``key=value`` overrides checked against
a typed schema (a dataclass per subcommand).

Values are parsed by Hydra's ``OverridesParser``, as ``run``'s, so lists (``lengths=[256,512]``),
quoting (``name='a b'``), ``null``, numbers and booleans read the same in every subcommand; a
comma list (``seeds=0,1``) is a list, and ``glob(...)``/``choice(...)`` keep their text for the
commands that expand them. Dotted keys reach into dict fields (``model.dim=128``). The values are
merged into the dataclass with OmegaConf's structured merge, which checks their types.

An unknown key, a malformed argument or a value of the wrong type is a :class:`UsageError`: one
line naming the valid keys (and the closest one), which the front door prints as ``error: ...``
with exit status 2. ``schema_help`` renders a schema's keys (type, default, one-line
description from the field's ``metadata["help"]`` or its trailing ``# comment``) for ``--help``;
``to_yaml`` prints the composed settings for ``--cfg job``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import typing
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a settings schema: a dataclass


class UsageError(ValueError):
    """A command line that cannot be read as asked (unknown key, bad value, unknown name): one line."""


def did_you_mean(word: str, valid: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid word, or ``""``."""
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key(key: str, valid: typing.Iterable[str], command: str) -> UsageError:
    """The error for a key no schema field has: the valid keys and the closest one."""
    valid = list(valid)
    return UsageError(f"unknown key '{key}' for {command}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")


def parse_value(text: str) -> Any:
    """The value of one ``key=value`` argument as Hydra reads it (``[a,b]`` a list, ``a,b`` a list,
    ``'x y'`` a string, ``3`` an int, ``null`` None; ``glob(...)``/``choice(...)`` kept as text)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"x={text}")
    except HydraException as exc:
        raise UsageError(f"cannot read the value {text!r}: {str(exc).splitlines()[0]}") from None
    value = override.value()
    if isinstance(value, ChoiceSweep) and not value.simple_form:  # choice(a,b): for the command to expand
        return text
    if isinstance(value, ChoiceSweep):  # a,b: a list
        return [v for v in value.list]
    if override.is_sweep_override():  # glob(...), range(...), interval(...)
        return text
    return value


def _as_text(text: str) -> str | None:
    """A string setting's value: as typed, without one pair of surrounding quotes; ``null`` is None."""
    if text == "null":
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def split(argv: typing.Iterable[str], command: str) -> list[tuple[str, str]]:
    """``key=value`` arguments -> [(key, value text)]; anything else is a UsageError."""
    pairs = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key or key.startswith("-"):
            raise UsageError(
                f"{command} takes key=value arguments, got '{arg}' (see python -m harness {command} --help)"
            )
        pairs.append((key, value))
    return pairs


def parse(schema: type[T], argv: typing.Iterable[str], *, command: str, refused: dict[str, str] | None = None) -> T:
    """``key=value`` arguments -> an instance of the dataclass ``schema``, checked: every key a field
    (a dotted key reaches into a dict field), every value of the field's type. ``refused`` maps an
    old spelling to the hint its error gives (``{"out": "use results_dir="}``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    names = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    lists = {n for n in names if typing.get_origin(hints.get(n)) is list}
    # a path or a name: the text as typed (a folder "my runs/é'q" is not Hydra grammar)
    texts = {n for n in names if hints.get(n) in (str, str | None)}
    cfg = OmegaConf.structured(schema)
    for key, text in split(argv, command):
        root = key.split(".")[0]
        if refused and root in refused:
            raise UsageError(f"{command}: '{root}=' is not a setting: {refused[root]}")
        if root not in names:
            raise unknown_key(root, names, command)
        value = _as_text(text) if key == root and root in texts else parse_value(text)
        if key == root and root in lists and not isinstance(value, list) and value is not None:
            value = [value]  # lengths=1024 is lengths=[1024]
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise UsageError(f"{command}: {key}={text}: {_first_line(exc)}") from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except MissingMandatoryValue:
        missing = [n for n in names if OmegaConf.is_missing(cfg, n)]
        raise UsageError(f"{command} needs {' '.join(f'{n}=...' for n in missing)} (see --help)") from None
    except OmegaConfBaseException as exc:
        raise UsageError(f"{command}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_choice(key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """A UsageError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise UsageError(
            f"{key}={value!r} is not one of {', '.join(map(str, choices))}{did_you_mean(str(value), map(str, choices))}"
        )


def to_yaml(settings: Any) -> str:
    """The composed settings (a dataclass instance or a mapping) as YAML, for ``--cfg job``."""
    from omegaconf import OmegaConf

    if dataclasses.is_dataclass(settings):
        settings = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return OmegaConf.to_yaml(OmegaConf.create(_plain(settings)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ============================================================================= --help


def field_comments(schema: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the dataclass's source (``{}`` when unreadable)."""
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = " ".join(
                comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments
            )
            if text:
                out[node.target.id] = text
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp.replace("typing.", "")
    if tp is Any:
        return "any"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory called), or ``"???"`` (OmegaConf's MISSING) when required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "???":
        return "(required)"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}" if value else "{}"
    return str(value)


def schema_rows(schema: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field of the dataclass ``schema``."""
    hints = typing.get_type_hints(schema) if not isinstance(schema, str) else {}
    comments = field_comments(schema)
    rows = []
    for f in dataclasses.fields(schema):
        text = f.metadata.get("help") or comments.get(f.name, "")
        rows.append((f.name, _type_name(hints.get(f.name, f.type)), _show(field_default(f)), text))
    return rows


def schema_help(usage: str, paragraph: str, schema: type | None, *, extra: str = "") -> str:
    """The ``--help`` of a subcommand: a usage line, one paragraph, then the schema's keys with
    type, default and description (and ``extra``: a last paragraph, e.g. the subcommand's forms)."""
    from tabulate import tabulate

    parts = [f"usage: {usage}", textwrap.fill(" ".join(paragraph.split()), width=100)]
    if schema is not None:
        table = tabulate(
            [list(r) for r in schema_rows(schema)],
            headers=["key", "type", "default", "description"],
            tablefmt="plain",
            maxcolwidths=[None, 24, 28, 70],
        )
        parts.append("keys (key=value; lists as [a,b]):\n" + textwrap.indent(table, "  "))
    if extra:
        parts.append(extra.strip("\n"))
    return "\n\n".join(parts) + "\n"


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, as one line."""
    return " ".join((inspect.cleandoc(doc or "").split("\n\n")[0]).replace("``", "").split())
