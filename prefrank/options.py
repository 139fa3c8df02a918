"""Options defined once: each is a field of an options class, with its default, its help and what
the command line needs (flag, parser, choices); the command-line parsers are generated from them
(as TRL's HfArgumentParser does from its configs), and the classes carry their own checks.

  @options                          a keyword-only dataclass whose fields are options
  option(default, help, ...)        one option (decides_rows=False: it does not change the rows)
  add_options(parser, cls)          its fields as command-line options, in their groups
  from_args(cls, args, **values)    an instance from the options given on the command line
  row_options(obj)                  {name: value} of the fields that decide the rows: what --resume
                                    compares and the trainer's reference cache keys on
  flags(*classes)                   {field name: flag}, for messages (errors.InputError)

On the command line an option left out takes the class's default: the parsers never hold a
second copy of it (argparse.SUPPRESS).
"""
import argparse
import dataclasses
from dataclasses import MISSING, fields, is_dataclass

from prefrank.errors import OPTION_NAMES, InputError


def options(cls):
    """A keyword-only dataclass of options; its field names become known to error messages. Built in
    Python, it checks what the command line's parsers check: choices, and positive numbers."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self):
        _check_values(self)
        if own is not None:  # the class's own checks, which call their parents' as they need
            own(self)
        elif hasattr(super(cls, self), "__post_init__"):
            super(cls, self).__post_init__()

    cls.__post_init__ = __post_init__
    cls = dataclasses.dataclass(kw_only=True)(cls)
    OPTION_NAMES.update(f.name for f in fields(cls))
    return cls


def _check_values(obj):
    """What the command line's parsers check, for an options object built in Python."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise InputError(f"<{f.name}> {value!r}: expected one of {', '.join(map(str, meta['choices']))}")
        if meta.get("path") and value == "":
            raise InputError(f"<{f.name}> is empty: give a path (an unset shell variable?)")
        positive = meta.get("type") in (positive_int, positive_float)
        if positive and isinstance(value, (int, float)) and not value > 0:
            raise InputError(f"<{f.name}> must be positive, got {value}")


def option(default=MISSING, help: str = "", *, flag: str | None = None, type=None, choices=None,
           group: str | None = None, decides_rows: bool = True, path: bool = False, cli: bool = True,
           default_text: str | None = None, metavar: str | None = None, default_factory=MISSING):
    """One option. `flag`: its command-line flag (default: --field-name); `type`: the parser of its
    text; `group`: its group in --help; `decides_rows`: changing it changes the rows (resume
    refuses a run with another value); `path`: a local file or folder (compared resolved; never empty);
    `cli`: on the command line at all; `default_text`: the default as --help states it."""
    metadata = dict(help=help, flag=flag, type=type, choices=choices, group=group, decides_rows=decides_rows,
                    path=path, cli=cli, default_text=default_text, metavar=metavar)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _is_nested(f: dataclasses.Field) -> bool:
    return f.default_factory is not MISSING and is_dataclass(f.default_factory)


GROUPS = ("data and models", "columns", "tokenization", "DPO", "training", "judge", "execution", "safety")


def _fields_in_order(cls) -> list:
    """The class's own fields first, then those it inherits (own options lead their group)."""
    own = vars(cls).get("__annotations__", {})
    return sorted(fields(cls), key=lambda f: f.name not in own)


def add_options(parser, cls, *, skip=(), groups: dict | None = None, required: bool = True):
    """Add the command-line options of `cls` (nested options classes included) to `parser`, each to
    the argument group its field names, the groups in the order of GROUPS (pass `groups` to add to
    groups made before). Fields without a default are required unless `required` is False."""
    groups = {} if groups is None else groups
    for f in _fields_in_order(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        if _is_nested(f):
            add_options(parser, f.default_factory, skip=skip, groups=groups, required=required)
            continue
        for name in GROUPS[:GROUPS.index(meta["group"]) + 1] if meta.get("group") in GROUPS else ():
            groups.setdefault(name, parser.add_argument_group(name))  # earlier groups first
        target = groups[meta["group"]] if meta.get("group") else parser
        default = f.default
        text = meta["help"]
        shown = meta.get("default_text") or (None if default is MISSING or default is None or default is False else
                                             ",".join(map(str, default)) if isinstance(default, (list, tuple))
                                             else str(default))
        if shown:
            text += f" (default: {shown})"
        kwargs = dict(dest=f.name, help=text.replace("%", "%%"), default=argparse.SUPPRESS)
        if default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=meta.get("type") or (path_text if meta.get("path") else
                                                    type(default) if default not in (MISSING, None) else str),
                          metavar=meta.get("metavar") or flag_of(f)[2:].upper().replace("-", "_"))
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
                if not meta.get("metavar"):
                    kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            if default is MISSING and required:
                kwargs["required"] = True
        target.add_argument(flag_of(f), **kwargs)


def given(cls, args) -> dict:
    """The options of `cls` (not nested ones) that the command line gave."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if not _is_nested(f) and hasattr(args, f.name)}


def from_args(cls, args, **values):
    """An instance of `cls` from the command line's options, `values` taking precedence."""
    return cls(**{**given(cls, args), **values})


def row_options(obj) -> dict:
    """{field name: value} of the options that decide the rows (nested options classes included;
    local paths resolved, so that a relative path names the same input)."""
    import os
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(row_options(value))
        elif f.metadata.get("decides_rows", True):
            if f.metadata.get("path") and isinstance(value, str) and os.path.exists(value):
                value = os.path.realpath(value)
            out[f.name] = value
    return out


def flags(*classes) -> dict[str, str]:
    """{field name: flag} of the options of `classes` (nested ones included)."""
    out = {}
    for cls in classes:
        for f in fields(cls):
            if _is_nested(f):
                out.update(flags(f.default_factory))
            elif f.metadata.get("cli", True):
                out[f.name] = flag_of(f)
    return out


# ---------------------------------------------------------------- parsers of option values

def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def path_text(text: str) -> str:
    """A path (or hub id) option's text: an empty one (an unset shell variable) names nothing, where it
    would else mean the built-in task, or the current folder."""
    if text == "":
        raise argparse.ArgumentTypeError("is empty: give a path (an unset shell variable?)")
    return text


def name_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def escaped_text(text: str) -> str:
    """Text with the escapes \\n, \\t and \\\\ read (a separator typed on a command line: '\\n\\n')."""
    out, chars = [], iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            if nxt not in _ESCAPES:
                raise argparse.ArgumentTypeError(f"unknown escape \\{nxt} in {text!r}: \\n, \\t and \\\\ are read")
            c = _ESCAPES[nxt]
        out.append(c)
    return "".join(out)


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("expected one or more positive numbers")
    return values
