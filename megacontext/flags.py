"""
The command lines of megacontext's tools (megacontext.eval, megacontext.run): a module's DEFAULTS,
under a YAML config file, under `--key=value` (or `--key value`) flags, all read before torch is
imported so that a typo costs nothing.

    overrides, named = split_argv(argv, __doc__, DEFAULTS, {"config": None, "out": None, "tasks": []})
    data = read_config_file(named["config"], example="configs/eval_cpu.yaml")

This module only splits and reads; each tool checks and coerces its own keys.
"""

import sys

import yaml


def split_argv(argv, doc, defaults, named):
    """argv -> (overrides {key: raw string}, {name: value} for the flags in `named`). `named` maps
    the tool's own flags (e.g. config, out) to their default; a list default collects every use
    of the flag. Dashes in keys read as underscores. -h/--help prints doc and the config keys
    with their defaults, then exits 0. A bare argument or a flag without a value: ValueError."""
    overrides, values, i = {}, {k: (list(v) if isinstance(v, list) else v) for k, v in named.items()}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(doc)
            print("config keys (defaults):\n" + "\n".join(f"  {k}: {v!r}" for k, v in defaults.items()))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument '{arg}'; use --key=value")
        key, value = (arg[2:].split("=", 1) + [None])[:2]
        if value is None:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        key = key.replace("-", "_")
        if key in values and isinstance(values[key], list):
            values[key].append(value)
        elif key in values:
            values[key] = value
        else:
            overrides[key] = value
        i += 1
    return overrides, values


def read_config_file(path, example):
    """The key: value mapping of the YAML file at path ({} for an empty file); a missing file or
    one that is not a mapping is a ValueError that names `example`."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path} (see {example})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must be a mapping of key: value (see {example})")
    return data
