"""One config mechanism for every job kind and command: dataclass config <-> command-line
flags <-> the equivalent command a page shows.

A command's settings are a dataclass that subclasses `JobConfig` (score: `ScoreConfig`, mask:
`MaskCommandConfig`, train: `TrainConfig`, generate: `GenDataConfig`, eval: `EvalConfig`,
protocol: `ProtocolConfig`, sweep: `SweepConfig`, report: `ReportConfig`, models:
`ModelsConfig`, jobs: `JobsConfig`, backend: `BackendConfig`, tasks: `TasksConfig`, migrate:
`MigrateConfig`). Only `app` (serve the app) and `job-run` (the job queue's internal launcher)
are built by hand in `core/cli.py`: neither is a setting a page shows or a run records. What a
command needs beyond its settings (`--submit`, `--backend`, `--run-dir`) is added there too.
The class says:

- `COMMAND`: its `python -m core COMMAND` subcommand;
- `PRESETS` and `DEFAULT_PRESET`: named overrides of the dataclass defaults (a `preset` field
  records the one used); a kind without presets leaves `PRESETS` empty and has no such field;
- `EXCLUSIVE`: groups of fields of which one is set at a time (task vs data): a flag for one
  clears the others, and a command leaves out the None that another member implies;
- `ALWAYS`: fields the command always spells out, even at their default;
- `CONFIG_FILE`: whether the command takes `--config FILE` (a run's config.json) under the flags.

Field metadata: "help"; "choices"; "parse" (text -> value) for a type the annotation does not
tell; "flag" (a flag name other than the field's); "aliases" (more flag names that set it, e.g.
an older spelling; the command writes the main one); "required" (the flag must be given);
"repeat" (a list given as the flag repeated, not comma-separated); "metavar"; "cli": False for a
derived field that has no flag; "positional": True for a positional argument instead of a flag
(`jobs show ID`): a list takes one or more words (none or more unless "required"), a field that
is not "required" may be left out (its dataclass default, which argparse puts in the namespace),
and the command writes positionals first, in field order, a None one left out.
`field_from(Other, "name")` declares a field as another dataclass declares it (default, help,
choices), so a setting's vocabulary is written once: `TrainConfig` and the `mask` command take
their mask fields from `core.masking.config.MaskConfig`, `score` its model fields from
`core.model.config.ModelsConfig`.

Flags: `--field-name VALUE` per field; booleans `--x` / `--no-x`; `X | None` fields take "none";
lists take "a,b"; dicts take JSON. Every flag stays out of the namespace unless given, so the
layers are: dataclass defaults, then the preset, then `--config`, then the flags given.
`config.command()` spells out what differs from the preset (and every "required" field) and
parses back to an equal config
(`tests/test_config.py` checks that for every job kind).
"""

from __future__ import annotations

import argparse
import json
import shlex
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from core.errors import LensError

C = TypeVar("C", bound="JobConfig")
NONE_WORDS = ("none", "null", "")


def help_meta(text: str, **extra: Any) -> dict[str, Any]:
    """A config field's metadata: its help text plus any of the keys the module docstring lists."""
    return {"help": text, **extra}


def field_from(cls: type, name: str, **meta: Any) -> Any:
    """A dataclass field declared as `cls` declares its field `name` (default, help, choices,
    ...), with the metadata `meta` added or replaced."""
    source = next(f for f in fields(cls) if f.name == name)
    metadata = {**source.metadata, **meta}
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)


def parse_optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, or None for "none", "null" or an empty value."""

    def parse(text: str) -> Any:
        if text.strip().lower() in NONE_WORDS:
            return None
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def parse_list(kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """An argparse type: "a,b" -> [kind("a"), kind("b")]; "none" or "" -> []."""

    def parse(text: str) -> list[Any]:
        if text.strip().lower() in NONE_WORDS:
            return []
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            name = getattr(kind, "__name__", "value")
            raise LensError(f"Expected comma-separated {name} values, got {text!r}.") from None

    parse.__name__ = f"list[{getattr(kind, '__name__', 'value')}]"
    return parse


def parse_json_or_list(text: str) -> Any:
    """An argparse type for a field that takes JSON or a comma-separated list of names.

    Text that starts as JSON does (`{`, `[` or `"`) must be JSON: a broken object is a one-line
    error, not a list holding one odd name."""
    try:
        return json.loads(text)
    except ValueError as exc:
        if text.lstrip()[:1] in ("{", "[", '"'):
            # argparse names the flag: "argument --eval-suite: '{bad' is not valid JSON (...)"
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
        return [t.strip() for t in text.split(",") if t.strip()]


def cli_flag(name: str) -> str:
    """The command-line flag of a config field: `max_length` -> `--max-length`."""
    return "--" + name.replace("_", "-")


def flag_text(value: Any) -> str:
    """How a value is written on the command line (the inverse of the flag's parser)."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config JSON file's object, or a one-line `LensError`."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LensError(f"Cannot read config {p}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise LensError(f"{p} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise LensError(f"{p} must hold a JSON object of settings.")
    return data


def _flag_type(hint: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(argparse type, is_bool) of a field annotation."""
    if hint is bool:
        return None, True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if (optional and args) else hint
    if typing.get_origin(base) is list:
        inner = typing.get_args(base)
        return parse_list(inner[0] if inner else str), False
    if base in (int, float, str):
        return (parse_optional(base) if optional else base), False
    return parse_json_or_list, False


class JobConfig:
    """Base of the job kinds' dataclass configs (see the module docstring)."""

    COMMAND: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_PRESET: ClassVar[str | None] = None
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = ()
    ALWAYS: ClassVar[tuple[str, ...]] = ()
    CONFIG_FILE: ClassVar[bool] = False
    LABEL: ClassVar[str] = "job"  # "Unknown <LABEL> setting(s)"
    PRESET_NOUN: ClassVar[str] = "preset"  # "Unknown <PRESET_NOUN> 'x'"
    IGNORED_KEYS: ClassVar[tuple[str, ...]] = ()  # keys of config.json that are not fields

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_preset(cls: type[C], preset: str | None = None, /, **overrides: Any) -> C:
        """The preset's values, then `overrides`."""
        if not cls.PRESETS:
            return cls(**overrides)
        name = preset or cls.DEFAULT_PRESET
        if name not in cls.PRESETS:
            raise LensError(f"Unknown {cls.PRESET_NOUN} '{name}' (use {', '.join(cls.PRESETS)}).")
        return cls(**{**cls.PRESETS[name], "preset": name, **overrides})

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """From a `config.json` dict: the named preset first, then the given keys."""
        if not isinstance(data, dict):
            raise LensError(f"A {cls.LABEL} config must be a JSON object.")
        values = {k: v for k, v in data.items() if k not in cls.IGNORED_KEYS}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise LensError(f"Unknown {cls.LABEL} setting(s): {', '.join(unknown)}.")
        preset = values.pop("preset", None) if cls.PRESETS else None
        return cls.from_preset(preset, **values)

    @classmethod
    def from_json_file(cls: type[C], path: str | Path) -> C:
        """Read a config JSON file (e.g. a run's config.json)."""
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what config.json holds)."""
        return asdict(self)  # type: ignore[call-overload]

    def preset_defaults(self) -> dict[str, Any]:
        """The values this config's preset gives (the dataclass defaults without presets: what
        a flag left out means, also for a kind with required fields)."""
        if not self.PRESETS:
            return {f.name: field_default(type(self), f.name) for f in fields(self)}  # type: ignore[arg-type]
        preset = getattr(self, "preset")  # noqa: B009 - a dataclass field
        return asdict(type(self).from_preset(preset))  # type: ignore[call-overload]

    # -- command line -----------------------------------------------------------------------

    @classmethod
    def cli_fields(cls) -> list[Any]:
        """The dataclass fields that have a flag."""
        return [f for f in fields(cls) if f.metadata.get("cli", True) and f.name != "preset"]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """`--config` (if the kind takes one), `--preset` (if it has presets) and one flag per
        field; none of them is in the namespace unless given."""
        if cls.CONFIG_FILE:
            parser.add_argument(
                "--config",
                default=argparse.SUPPRESS,
                help=f"{cls.LABEL} config JSON (e.g. a run's config.json)",
            )
        if cls.PRESETS:
            preset = next(f for f in fields(cls) if f.name == "preset")
            parser.add_argument(
                "--preset",
                default=argparse.SUPPRESS,
                choices=list(cls.PRESETS),
                help=preset.metadata.get("help"),
            )
        hints = typing.get_type_hints(cls)
        for f in cls.cli_fields():
            meta = f.metadata
            if meta.get("positional"):
                _add_positional(parser, f, hints[f.name])
                continue
            flag = cli_flag(meta.get("flag", f.name))
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "default": argparse.SUPPRESS,
                "help": meta.get("help"),
            }
            parse, is_bool = _flag_type(hints[f.name])
            if is_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif meta.get("repeat"):
                kwargs["action"] = "append"
                kwargs["metavar"] = meta.get("metavar", "NAME")
            else:
                kwargs["type"] = meta.get("parse", parse)
                if "choices" in meta:
                    kwargs["choices"] = list(meta["choices"])
                else:
                    kwargs["metavar"] = meta.get("metavar", _metavar(hints[f.name]))
            if meta.get("required"):
                kwargs["required"] = True
            parser.add_argument(flag, *meta.get("aliases", ()), **kwargs)

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace) -> C:
        """`--preset`, then `--config` (if any), then every flag given on the command line.

        An explicit `--preset` with a `--config` file replaces the file's preset defaults but
        keeps the file's explicit values."""
        base: dict[str, Any] = {}
        if cls.CONFIG_FILE and getattr(args, "config", None):
            base = cls.from_json_file(args.config).to_dict()
            base = {k: v for k, v in base.items() if k not in cls.IGNORED_KEYS}
        given = {f.name: getattr(args, f.name) for f in cls.cli_fields() if hasattr(args, f.name)}
        for group in cls.EXCLUSIVE:
            chosen = [name for name in group if given.get(name) is not None]
            for name in group:
                if chosen and name not in chosen and name not in given:
                    given[name] = None
        if not cls.PRESETS:
            return cls.from_dict({**base, **given})
        explicit = getattr(args, "preset", None)
        file_preset = base.pop("preset", None)
        if explicit and base:
            defaults = asdict(cls.from_preset(file_preset))  # type: ignore[call-overload]
            base = {k: v for k, v in base.items() if defaults.get(k) != v}
        return cls.from_preset(explicit or file_preset, **{**base, **given})

    def command_values(self) -> dict[str, Any]:
        """Field -> value the command spells out: what differs from the preset, plus `ALWAYS`,
        less a None that another member of its `EXCLUSIVE` group implies."""
        defaults = self.preset_defaults()
        out: dict[str, Any] = {}
        for f in self.cli_fields():
            value = getattr(self, f.name)
            always = f.name in self.ALWAYS or f.metadata.get("required")
            if value == defaults.get(f.name) and not always:
                continue
            group = next((g for g in self.EXCLUSIVE if f.name in g), ())
            if value is None and any(getattr(self, o) is not None for o in group if o != f.name):
                continue
            out[f.name] = value
        return out

    def command(self, *, submit: bool = False, extra: Sequence[str] = ()) -> str:
        """The exact `python -m core COMMAND ...` command that gives this config."""
        parts = ["python", "-m", "core", self.COMMAND]
        if self.PRESETS:
            parts += ["--preset", str(getattr(self, "preset"))]  # noqa: B009 - a dataclass field
        meta = {f.name: f.metadata for f in fields(self)}  # type: ignore[arg-type]
        for f in self.cli_fields():
            value = getattr(self, f.name)
            if not f.metadata.get("positional") or value is None:
                continue
            parts += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        for name, value in self.command_values().items():
            if meta[name].get("positional"):
                continue
            flag = cli_flag(meta[name].get("flag", name))
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + flag[2:])
            elif meta[name].get("repeat"):
                for item in value or ():
                    parts += [flag, str(item)]
            else:
                parts += [flag, flag_text(value)]
        parts += list(extra)
        if submit:
            parts.append("--submit")
        return shlex.join(parts)


def _add_positional(parser: argparse.ArgumentParser, f: Any, hint: Any) -> None:
    """A positional argument for the field `f` (metadata "positional"; see the module docstring)."""
    meta = f.metadata
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if (type(None) in typing.get_args(hint) and args) else hint
    kwargs: dict[str, Any] = {"help": meta.get("help")}
    if typing.get_origin(base) is list:
        inner = typing.get_args(base)
        kind: Any = inner[0] if inner else str
        kwargs["nargs"] = "+" if meta.get("required") else "*"
    else:
        kind = base if base in (int, float, str) else str
    if not meta.get("required"):
        kwargs["default"] = _default_of(f)
        kwargs.setdefault("nargs", "?")
    kwargs["type"] = meta.get("parse", kind)
    if "choices" in meta:
        kwargs["choices"] = list(meta["choices"])
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    parser.add_argument(f.name, **kwargs)


def _default_of(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(f.name)


def _metavar(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if typing.get_origin(base) is list:
        return "A,B"
    return getattr(base, "__name__", "VALUE").upper()


def field_default(cls: type, name: str) -> Any:
    """The dataclass default of one field (for help texts and pages)."""
    return _default_of(next(f for f in fields(cls) if f.name == name))
