"""Job commands generated from the config models: a job option is declared once, as a pydantic ``Field`` (type,
default, help), and ``ipsr <job>`` and ``python -m jobs.<job>`` are the same command.

Flags are ``--field-name``; ``json_schema_extra={"flag": "--model"}`` renames one, ``{"multiple": True}`` makes it
repeatable. A flag left out is ``None``, so YAML (``--config``) and ``IPSR_<JOB>_*`` settings show through
(``build_config``: YAML < environment < flags). Values reach pydantic as typed by click for numbers and booleans
and as text otherwise (Literals, lists, fractions), so every mistake is one ``error: invalid <Config>: …`` line.
"""

from __future__ import annotations

import contextlib
import inspect
import pkgutil
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ipsr_model.errors import UserError
from ipsr_model.paths import logs_dir
from ipsr_platform import console

VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose", help="Show Ray's and the libraries' logs live (default: into a log file whose path is printed)."
    ),
]


def output(job: str, verbose: bool):
    """ipsr's own progress and tables on the terminal; the libraries' detail in a log file unless --verbose."""
    return console.quiet(job, logs_dir(), enabled=not verbose)


def _flag_type(annotation: Any) -> type:
    """int/float/bool as such; everything else (str, Literal, tuple, dict) as text for pydantic to parse."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (bool, int, float) else str


def _choices(annotation: Any) -> str | None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(map(str, args)) + "."
    inner = [a for a in args if typing.get_origin(a) is typing.Literal]  # Optional[Literal] or tuple[Literal, ...]
    return "Any of " + ", ".join(map(str, typing.get_args(inner[0]))) + "." if inner else None


def _default(value: Any) -> str | None:
    if value in (None, "", {}, (), False):
        return None
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f"(default {value})"


def _parameter(name: str, field: Any) -> inspect.Parameter:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    flag = extra.get("flag", "--" + name.replace("_", "-"))
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    text = " ".join(filter(None, [field.description, _choices(field.annotation), _default(default)]))
    kind = _flag_type(field.annotation)
    if kind is bool and default is not False:  # off by default: a switch; else both spellings (YAML "true" overridable)
        flag = f"{flag}/--no-{flag[2:]}"
    multiple = extra.get("multiple")
    option = typer.Option(flag, help=(text + " Repeatable.") if multiple else text)
    annotation = Annotated[Optional[list[str] if multiple else kind], option]  # type: ignore[valid-type]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def job_command(
    job: str, runner: Callable[[Any], Any] | str, *, doc: str | None = None, quiet: bool = True
) -> Callable[..., None]:
    """A typer command function for ``job`` (a section of ``config.job_configs()``): one flag per config field,
    plus ``--config`` (and ``--verbose`` when ``quiet``). ``runner`` gets the built config; a ``"module:function"``
    string is imported only when the command runs (``ipsr --help`` stays fast)."""
    from ipsr_platform.config import build_config, job_configs

    model, prefix = job_configs()[job]
    own = model.__dict__.get("__annotations__", {})  # the job's own fields lead its --help; shared ones follow
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] not in own)
    params = [_parameter(name, field) for name, field in fields]
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[Path], typer.Option(help=f"YAML with any option (< {prefix}* env < flags).")],
        )
    )
    if quiet:
        params.append(
            inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOption)
        )

    def command(**values: Any) -> None:
        yaml_file, verbose = values.pop("config", None), values.pop("verbose", False)
        flags = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        with output(job, verbose) if quiet else contextlib.nullcontext():
            run = runner if callable(runner) else pkgutil.resolve_name(runner)
            run(build_config(model, env_prefix=prefix, yaml_file=yaml_file, **flags))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = job
    command.__doc__ = doc or (model.__doc__ or "").strip()
    return command


def run_main(app: Callable[..., Any], argv: list[str] | None = None) -> None:
    """Run a typer app or command: a ``UserError`` is one ``error: …`` line and exit status 2; any other error
    keeps its traceback, after a pointer to the log file that holds what led to it."""
    if not isinstance(app, typer.Typer):
        command, app = app, typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        app.command()(command)
    try:
        app(args=argv)
    except UserError as err:
        console.say(f"error: {err}", error=True)
        sys.exit(2)
    except Exception:
        log = console.log_file()
        if log is not None:  # the traceback also goes into the log, after the detail that led to it
            import traceback

            with open(log, "a", encoding="utf-8") as file:
                traceback.print_exc(file=file)
            console.say(f"(what led to the error below is in {log})", error=True)
        raise
