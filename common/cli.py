"""Command-line plumbing shared by every stage.

Configs are dataclasses; :func:`parse_config` turns their fields into ``--flags`` (``snake_case``
field -> ``--snake-case`` flag, booleans become ``--flag/--no-flag``, ``Literal``/``choices``
metadata become choices, the field's ``metadata["help"]`` becomes the help text).
:func:`run_main` wraps a command so that expected failures (:class:`UserError`, bad flags,
a full disk) print one line and exit with code 2, never a traceback.
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


class UserError(Exception):
    """An error caused by the user's input or environment; printed as one line, exit code 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """Build an argparse parser from a dataclass: one flag per field."""
    parser = _OneLineParser(prog=command_file(),
                            description=description or (config_cls.__doc__ or "").strip().splitlines()[0],
                            allow_abbrev=False)  # a misspelt or shortened flag is an error, never another flag
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = field.metadata.get("help", "")
        kwargs: dict[str, Any] = {"default": default, "dest": field.name}
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin is typing.Union and type(None) in args:  # Optional[X]
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {default})", **kwargs)
            continue
        if origin is typing.Literal:
            kwargs["choices"] = list(args)
            kwargs["type"] = type(args[0])
        elif origin in (list, tuple, Sequence):
            kwargs["nargs"] = "*"
            kwargs["type"] = args[0] if args else str
        elif hint in (int, float, str):
            kwargs["type"] = hint
        elif hint is Path:
            kwargs["type"] = Path
        else:
            kwargs["type"] = str
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(_flag(field.name), help=f"{help_text} (default: {default})", **kwargs)
    return parser


def parse_config(config_cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse ``argv`` into an instance of the dataclass ``config_cls``."""
    parser = build_parser(config_cls, description)
    ns = parser.parse_args(argv)
    return config_cls(**vars(ns))


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
