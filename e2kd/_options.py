"""Options declared once: a stage's options dataclass field carries its flag's help, range, choices and former
names (:func:`option`); :func:`click_options` makes the command's click options from it, :func:`check_options`
validates an instance, and the YAML keys are the field names (``e2kd._config.build_options``). The help shows the
field's own default, so a default cannot drift from its help.

Light on purpose: the CLI imports options classes to build ``--help``, which must not load torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

__all__ = ["Opt", "option", "click_options", "check_options", "former_names", "take_former"]

F = TypeVar("F", bound=Callable[..., Any])
_KEY = "e2kd.option"


@dataclass(frozen=True)
class Opt:
    """What the command line and YAML need to know of one option beyond its type and default."""

    help: str = ""
    lo: float | None = None  #: smallest value allowed (inclusive unless ``exclusive_lo``)
    hi: float | None = None  #: largest value allowed
    exclusive_lo: bool = False
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None  #: a callable: asked when used (plug-ins)
    path: str | None = None  #: ``"file"``, ``"dir"`` or ``"any"``: the flag takes a path of that kind
    former: tuple[str, ...] = ()  #: former flag names: accepted, hidden from --help (and as YAML keys)
    default_text: str | None = None  #: how --help states the default where the value alone says too little
    flag: str | None = None  #: the flag's name where it is not the field's (``lam`` → ``--lambda``)
    cli: bool = True  #: False: set by the command itself (e.g. ``progress`` from ``--quiet``), no flag
    multiple: bool = False  #: the flag may be given several times (the command turns the tuple into the value)
    envvar: str | None = None  #: an environment variable that sets the flag (shown in --help)
    text: bool = False  #: the flag takes text the command parses into the field's value (e.g. ``HxW``)
    exists: bool = False  #: a path flag whose path must exist
    hidden: bool = False  #: accepted, not shown in --help
    dest: str | None = None  #: the click parameter's name where the field's would shadow a builtin (``format``)


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, repr: bool = True,
           **spec: Any) -> Any:
    """A dataclass field that is also a command-line option and a YAML key (``spec``: :class:`Opt`'s fields;
    ``repr=False`` keeps a value, e.g. credentials, out of the options' repr)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, repr=repr, metadata={_KEY: Opt(**spec)})
    return dataclasses.field(default=default, repr=repr, metadata={_KEY: Opt(**spec)})


def _spec(f: dataclasses.Field) -> Opt:
    return f.metadata.get(_KEY) or Opt()


def flag_name(f: dataclasses.Field) -> str:
    """The option's flag, ``--field-name`` unless the field says otherwise."""
    return _spec(f).flag or "--" + f.name.replace("_", "-")


def former_names(cls: type) -> dict[str, str]:
    """``former field-like name → field`` of every option's former flags (YAML keys too)."""
    return {old.lstrip("-").replace("-", "_"): f.name for f in dataclasses.fields(cls) for old in _spec(f).former}


def click_options(cls: type, skip: Sequence[str] = (),
                  after: dict[str, Callable[[Any], Any]] | None = None) -> Callable[[F], F]:
    """Decorate a click command with one option per field of ``cls`` (in field order; ``skip``: fields set
    otherwise; ``after``: a command-only click option to show after a field's, e.g. ``--teacher-run``). Every option
    defaults to None — unset — so a YAML file or the dataclass default applies."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if _spec(f).cli and f.name not in skip]

    def decorate(command: F) -> F:
        for f in reversed(fields):
            if after and f.name in after:
                command = after[f.name](command)
            for old in _spec(f).former:
                command = click.option(old, f"former__{f.name}", hidden=True, **_click_kwargs(f, hints[f.name],
                                                                                             help_text=False))(command)
            command = click.option(*_declarations(f, hints[f.name]), _spec(f).dest or f.name,
                                   **_click_kwargs(f, hints[f.name]))(command)
        return command

    return decorate


def _choices(spec: Opt) -> tuple[str, ...]:
    return tuple(spec.choices() if callable(spec.choices) else spec.choices or ())


def _declarations(f: dataclasses.Field, hint: Any) -> list[str]:
    name = flag_name(f)
    if _base(hint) is bool:
        return [f"{name}/--no-{name[2:]}"]
    return [name]


def _base(hint: Any) -> Any:
    """``X`` of ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _click_kwargs(f: dataclasses.Field, hint: Any, help_text: bool = True) -> dict[str, Any]:
    spec, base = _spec(f), _base(hint)
    kwargs: dict[str, Any] = {"default": None}
    if spec.text:
        kwargs["type"] = str
    elif typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        kwargs.update(nargs=len(args), type=args[0])
    elif spec.choices:
        kwargs["type"] = click.Choice(list(_choices(spec)))
    elif spec.path:
        kwargs["type"] = click.Path(file_okay=spec.path != "dir", dir_okay=spec.path != "file", exists=spec.exists)
    elif base in (int, float):  # a range is checked by check_options: one Error: line, flag or YAML alike
        kwargs["type"] = base
    elif base is bool:
        pass  # --x/--no-x
    elif base is not str:
        kwargs["type"] = str  # JSON and other structured values are parsed by the command
    if spec.multiple:
        kwargs.update(multiple=True, default=None)
    if spec.envvar:
        kwargs.update(envvar=spec.envvar, show_envvar=True)
    if spec.hidden:
        kwargs["hidden"] = True
    if help_text:
        kwargs["help"] = _help(f, spec)
    return kwargs


def _help(f: dataclasses.Field, spec: Opt) -> str:
    text = _help_and_default(f, spec)
    if spec.lo is None and spec.hi is None:
        return text
    lo = "" if spec.lo is None else f"{spec.lo:g}{'<' if spec.exclusive_lo else '<='}"
    hi = "" if spec.hi is None else f"<={spec.hi:g}"
    bounds = f"{lo}x{hi}" if lo and hi else (f"x{'>' if spec.exclusive_lo else '>='}{spec.lo:g}" if lo else f"x{hi}")
    return f"{text}  [{bounds}]" if text else f"[{bounds}]"


def _help_and_default(f: dataclasses.Field, spec: Opt) -> str:
    default = spec.default_text
    if default is None:
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif callable(f.default_factory):
            value = f.default_factory()
        else:
            return spec.help  # required
        if value is None or value is False or value == {}:
            return spec.help
        default = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return f"{spec.help}  [default: {default}]" if spec.help else f"[default: {default}]"


def take_former(params: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """A command's parameters with values given under former flag names moved to their option (both at once must
    agree), and, with ``cls``, those under a ``dest`` back under their field's name."""
    if cls is not None:
        for f in dataclasses.fields(cls):
            dest = _spec(f).dest
            if dest and dest in params:
                params[f.name] = params.pop(dest)
    for key in [k for k in params if k.startswith("former__")]:
        value, dest = params.pop(key), key[len("former__"):]
        if value is None:
            continue
        if params.get(dest) not in (None, value):
            raise click.UsageError(f"--{dest.replace('_', '-')} is given twice (once under its former name)")
        params[dest] = value
    return params


def check_options(obj: Any) -> None:
    """``ValueError`` naming the flag for every value out of its declared range or choices (values from YAML or
    Python; click checks the flags)."""
    from e2kd._config import check_range

    for f in dataclasses.fields(obj):
        spec, value = _spec(f), getattr(obj, f.name)
        if value is None:
            continue
        if spec.choices is not None and value not in _choices(spec):
            raise ValueError(f"{flag_name(f)} must be one of {', '.join(_choices(spec))}, got {value!r}")
        if spec.lo is not None or spec.hi is not None:
            for v in value if isinstance(value, (tuple, list)) else (value,):
                check_range(flag_name(f), v, spec.lo, spec.hi, exclusive_lo=spec.exclusive_lo)
