"""Settings of a command from three places: flags win, then TPI_* environment variables, then a
YAML file (--config), then the flag's default.

    args = parser.parse_args(argv)              # flags parsed with their defaults
    merge_settings(args, parser_of_command)     # fills what was not given on the command line

A setting `grpc_port` is the flag --grpc-port, the variable TPI_GRPC_PORT and the YAML key
`grpc_port` (or `grpc-port`). Values from the environment and the file go through the flag's
own type (and choices), so a bad value gets the same one-line error as a bad flag.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tpi_node.errors import UserError

ENV_PREFIX = "TPI_"


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """dests of the flags that appear in argv (--flag, --flag=value, or a prefix of it)."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    return given


def _convert(action: argparse.Action, raw, where: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise UserError(f"{where}: '{raw}' is not a boolean (true/false)")
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
        return [_convert_one(action, x, where) for x in items]
    return _convert_one(action, raw, where)


def _convert_one(action: argparse.Action, raw, where: str):
    try:
        value = action.type(str(raw)) if action.type else raw
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: '{raw}' is not one of {', '.join(map(str, action.choices))}")
    return value


def merge_settings(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """Fill every setting not given as a flag from TPI_<NAME>, else from the --config file."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    given = _given_on_command_line(parser, argv)
    cfg_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    file = load_yaml(cfg_path) if cfg_path else {}
    known = set()
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "config", "version") or not action.option_strings:
            continue
        known.add(dest)
        if dest in given:
            continue
        env_name = ENV_PREFIX + dest.upper()
        if env_name in environ:
            setattr(args, dest, _convert(action, environ[env_name], env_name))
        elif dest in file:
            setattr(args, dest, _convert(action, file[dest], f"{cfg_path}: {dest}"))
    unknown = sorted(set(file) - known)
    if unknown:
        raise UserError(f"config file {cfg_path}: unknown setting(s) {', '.join(unknown)}")
    return args


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of settings (flags win, then TPI_* environment variables, then the file)")
