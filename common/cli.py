"""Command-line plumbing shared by every stage.

Configs are dataclasses; :func:`parse_config` turns their fields into ``--flags`` (``snake_case``
field -> ``--snake-case`` flag, booleans become ``--flag/--no-flag``, a list takes any number of
values, the field's ``metadata["help"]`` becomes the help text) and checks the values. The rules
of a flag are its field's metadata, checked by :func:`check_config`:

- ``choices``: the allowed values (a ``Literal`` type gives them too; for a list, of each value);
- ``min`` / ``max``: inclusive bounds, ``gt`` / ``lt``: strict ones (for a list, of each value;
  ``None``, an optional flag not given, is not checked);
- ``min_items``: a list needs at least this many values.

A rule that relates several fields is the config's ``check()`` method (raising
:class:`UserError`), which :func:`check_config` calls after the per-field rules; a subclass that
adds to it calls ``super().check()``. A function that takes a config built in code (not parsed)
calls :func:`check_config` itself.

Errors: a value outside the choices, an unknown or misspelt flag, or a value that is not a number
is the parser's ``error: <command>: ... (see --help)``; a value outside its bounds or a broken
cross-field rule is a :class:`UserError` (``error: --flag must be >= 1, got 0``). :func:`run_main`
wraps a command so that these and other expected failures (:class:`UserError`, a full disk) print
one line and exit with code 2, never a traceback.

``--threads`` means the same in every command that takes it (:func:`threads_field`): the torch CPU
threads of each process that runs a model, :data:`DEFAULT_THREADS` by default, ``0`` = every core
this process may run on (:func:`resolve_threads`). On CPU the same count gives the same numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_WORKDIR = "runs/demo"
# --threads of every command that takes it: one thread gives the same numbers on any machine, is
# the fastest for the small ranking models and leaves the cores to parallel workers; 0 = every core
DEFAULT_THREADS = 1


class UserError(Exception):
    """An error caused by the user's input or environment; printed as one line, exit code 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def threads_field(of: str = "process that runs a model", note: str = "", **metadata: Any) -> Any:
    """The ``--threads`` field of a command's config: :data:`DEFAULT_THREADS`, >= 0 (0 = every core).
    ``of`` names what each count is for (a training job, a server worker), ``note`` is added to the
    help, ``metadata`` to the field's (e.g. ``stage="run"``)."""
    text = (f"torch CPU threads of each {of} (0 = every core it may run on; on CPU the same count gives the "
            f"same numbers)" + (f"; {note}" if note else ""))
    return dataclasses.field(default=DEFAULT_THREADS, metadata={"help": text, "min": 0, **metadata})


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int) -> int:
    """The thread count a ``--threads`` value stands for: itself, or :func:`available_cores` for 0."""
    return threads if threads > 0 else available_cores()


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error:`` line and exit code 2 (no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def command_file() -> str:
    """The file name a command is known by: ``train.py`` for ``python -m embeddings.train``, the
    package's name for a package run by its ``__main__.py`` (``synth.py`` for ``python -m data.synth``)."""
    if not sys.argv or not sys.argv[0]:
        return "dashrec"
    path = Path(sys.argv[0])
    return f"{path.parent.name}.py" if path.name == "__main__.py" else path.name


def _plain_hint(hint: Any) -> Any:
    """``X`` for ``Optional[X]``, else ``hint``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple, Sequence)


def _choices(field: dataclasses.Field, hint: Any) -> list | None:
    """The allowed values of a field (of each value, for a list): ``metadata["choices"]`` or a ``Literal``."""
    if "choices" in field.metadata:
        return list(field.metadata["choices"])
    if _is_list(hint) and typing.get_args(hint):
        hint = typing.get_args(hint)[0]
    return list(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else None


def _number(x: Any) -> str:
    return format(x, "g") if isinstance(x, float) else str(x)


def _bounds(meta: typing.Mapping[str, Any]) -> str | None:
    """The bounds of ``min``/``gt``/``max``/``lt`` in words (``>= 1``, ``in (0, 1]``), None without any."""
    low = ("[", ">=", meta["min"]) if "min" in meta else ("(", ">", meta["gt"]) if "gt" in meta else None
    high = ("]", "<=", meta["max"]) if "max" in meta else (")", "<", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f"in {low[0]}{_number(low[2])}, {_number(high[2])}{high[0]}"
    if low or high:
        _, op, limit = low or high  # type: ignore[misc]
        return f"{op} {_number(limit)}"
    return None


def _within(meta: typing.Mapping[str, Any], value: Any) -> bool:
    return (("min" not in meta or value >= meta["min"]) and ("gt" not in meta or value > meta["gt"])
            and ("max" not in meta or value <= meta["max"]) and ("lt" not in meta or value < meta["lt"]))


def _choice_problem(field: dataclasses.Field, hint: Any, value: Any) -> str | None:
    choices = _choices(field, _plain_hint(hint))
    if choices is None or value is None:
        return None
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v not in choices:
            return f"unknown {_flag(field.name)} {v!r}; expected one of {', '.join(map(str, choices))}"
    return None


def field_problem(field: dataclasses.Field, hint: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for ``field`` by its metadata (one line naming the flag), or None."""
    flag, meta = _flag(field.name), field.metadata
    if value is None or isinstance(value, bool):
        return None
    choice = _choice_problem(field, hint, value)
    if choice:
        return choice
    bounds = _bounds(meta)
    if isinstance(value, (list, tuple)):
        least = meta.get("min_items", 0)
        if len(value) >= least and (bounds is None or all(_within(meta, v) for v in value)):
            return None
        if least:
            count = "one or more" if least == 1 else f"at least {least}"
            choices = _choices(field, _plain_hint(hint))
            what = (f"values {bounds}" if bounds else f"of {', '.join(map(str, choices))}" if choices else "values")
            return f"{flag} must be {count} {what}, got {list(value)}"
        return f"{flag} values must be {bounds}, got {list(value)}"
    if bounds is not None and not _within(meta, value):
        return f"{flag} must be {bounds}, got {value}"
    return None


def check_config(cfg: Any) -> None:
    """Check ``cfg`` as :func:`parse_config` does: every field against its metadata (choices, bounds,
    ``min_items``; see the module docstring), then the config's own ``check()`` (the
    rules that relate several fields). Raises :class:`UserError` naming the first flag at fault."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        if field.init:
            problem = field_problem(field, hints[field.name], getattr(cfg, field.name))
            if problem:
                raise UserError(problem)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """Build an argparse parser from a dataclass: one flag per field."""
    parser = _OneLineParser(prog=command_file(),
                            description=description or (config_cls.__doc__ or "").strip().splitlines()[0],
                            allow_abbrev=False)  # a misspelt or shortened flag is an error, never another flag
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        hint = _plain_hint(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = field.metadata.get("help", "")
        bounds = _bounds(field.metadata)
        if bounds:
            help_text = f"{help_text} ({'each value ' if _is_list(hint) else ''}{bounds})"
        kwargs: dict[str, Any] = {"default": default, "dest": field.name}
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {default})", **kwargs)
            continue
        choices = _choices(field, hint)
        if _is_list(hint):
            kwargs["nargs"] = "*"
            item = args[0] if args else str
            kwargs["type"] = type(typing.get_args(item)[0]) if typing.get_origin(item) is typing.Literal else item
        elif origin is typing.Literal:
            kwargs["type"] = type(args[0])
        elif hint in (int, float, str):
            kwargs["type"] = hint
        elif hint is Path:
            kwargs["type"] = Path
        else:
            kwargs["type"] = str
        if choices is not None:  # checked by parse_config, in the project's words
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(_flag(field.name), help=f"{help_text} (default: {default})", **kwargs)
    return parser


def parse_config(config_cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse ``argv`` into an instance of the dataclass ``config_cls`` and check it (:func:`check_config`).

    A value outside a flag's choices is a parser error (exit code 2); a value outside its bounds or
    a broken cross-field rule raises :class:`UserError` (one ``error:`` line and exit code 2 under
    :func:`run_main`)."""
    parser = build_parser(config_cls, description)
    ns = parser.parse_args(argv)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.init:
            problem = _choice_problem(field, hints[field.name], getattr(ns, field.name))
            if problem:
                parser.error(problem)
    cfg = config_cls(**vars(ns))
    check_config(cfg)
    return cfg


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)  # fbgemm_gpu installs a root handler at import


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; turn expected failures into a one-line message and exit code 2."""
    setup_logging()
    prog = Path(command_file()).stem
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            print(f"error: {exc.strerror}: {exc.filename or ''} ({prog})", file=sys.stderr)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def with_fixed_hash_seed(module: str) -> None:
    """Re-execute ``python -m module`` with ``PYTHONHASHSEED=0`` unless it is already set so.

    For commands that write TorchScript: the compiler lists a module's constants in the order of
    a Python set of their names, which follows the per-process string hash seed, so the same
    model would give other bytes in every process. Call it first in the ``__main__`` block.
    """
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
                  {**os.environ, "PYTHONHASHSEED": "0"})
