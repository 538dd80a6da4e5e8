"""Reading a YAML config file into a checked Config, driven by the settings table."""

import os
import re

import yaml

from . import procman
from .ops import access_format
from .ops.logs import SYSLOG
from .settings import BY_NAME, DAEMON, DEFAULT_POOL, SETTINGS, SettingError
from .states import vm

# Settings a reload cannot apply (they keep their running value until a restart), and the
# listening socket's, which only a lone server owning its socket can apply by rebinding.
RESTART_ONLY = tuple(setting.name for setting in SETTINGS if not setting.live)
LISTENER = tuple(setting.name for setting in SETTINGS if setting.section == "listener")


class ConfigError(Exception):
    """Every problem found in a config, one per line, each naming its key."""

    def __init__(self, source, problems):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class Config:
    """Checked settings as attributes (`config.workers`), plus `source` and `base_dir`.

    The config a file gives holds the daemon-wide settings and every pool's defaults, and
    `pools`: pool name -> the Config of that pool (its `pool_name` set), in the file's order.
    A pool's Config has `pools` None, and `prefix`, what its problems are named with
    ("pools.shop." when the file names pools, else "")."""

    def __init__(self, values, source, base_dir, pool_name=None, prefix=""):
        self.__dict__.update(values)
        self.source = source
        self.base_dir = base_dir
        self.pool_name = pool_name
        self.prefix = prefix

    def lua_value(self, name):
        """The value con:config(name) returns: plain data only."""
        if name not in BY_NAME or name == "pools":
            return None
        value = getattr(self, name)
        return list(value) if isinstance(value, tuple) else value

    def thread_name(self, name):
        """A thread's name, which its log lines carry: named for its pool when the file
        names pools, so that the log tells them apart."""
        return f"{self.pool_name}/{name}" if self.prefix else name

    @property
    def max_clones(self):
        return self.clones or self.workers

    @property
    def unix_socket(self):
        return "/" in self.listen


def _resolve(base_dir, value):
    if isinstance(value, tuple):
        return tuple(_resolve(base_dir, item) for item in value)
    if value is None or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def _convert(raw, names, base_dir, problems, prefix=""):
    """The converted values of settings `names` from `raw` (the default where a name is
    missing); each bad value is a problem, named with `prefix`."""
    values = {}
    for name in names:
        setting = BY_NAME[name]
        value = raw.get(name, setting.default)
        try:
            value = setting.convert(value)
        except SettingError as exc:
            problems.append(f"{prefix}{name}: {exc}")
            continue
        # listen is a path only when it names a Unix socket (it contains a slash); logfile
        # is none when it says syslog
        if (setting.is_path and value is not None and (name != "listen" or "/" in value)
                and not (name == "logfile" and value == SYSLOG)):
            value = _resolve(base_dir, value)
        values[name] = value
    return values


def _pool_values(name, changes, defaults, base_dir, problems):
    """The values of pool `name`: `defaults` with its `changes` (raw) converted; None when
    one is bad (each a problem)."""
    found = len(problems)
    for key in changes:
        if key not in BY_NAME:
            problems.append(f"pools.{name}.{key}: unknown setting")
        elif BY_NAME[key].scope == DAEMON:
            problems.append(f"{key}: applies to the whole daemon; set it at the top level, not "
                            f"in pool '{name}'")
    names = [key for key in changes if key in BY_NAME and BY_NAME[key].scope != DAEMON]
    values = {**defaults, **_convert(changes, names, base_dir, problems, f"pools.{name}."),
              "pools": None}
    if len(problems) > found:
        return None
    return values


def from_mapping(raw, source="<config>", base_dir=None):
    """A Config from a mapping of raw values; raises ConfigError naming every bad key."""
    base_dir = base_dir or os.getcwd()
    problems = []
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must be a mapping of setting: value"])
    for key in raw:
        if key not in BY_NAME:
            problems.append(f"{key}: unknown setting")
    values = _convert(raw, BY_NAME, base_dir, problems)
    if problems:
        raise ConfigError(source, problems)
    named = values["pools"] is not None
    pools = {}
    for name, changes in (values["pools"] or {DEFAULT_POOL: {}}).items():
        pool = _pool_values(name, changes, values, base_dir, problems)
        if pool is not None:
            # with pools named in the file, each problem names its pool
            pools[name] = Config(pool, source, base_dir, name, f"pools.{name}." if named else "")
            problems += [pools[name].prefix + problem for problem in _cross_checks(pool)]
    problems += _shared_listeners(pools)
    if problems:
        raise ConfigError(source, problems)
    config = Config(values, source, base_dir)
    config.pools = pools
    return config


def _shared_listeners(pools):
    """Two pools on one listen address: the second could not bind it."""
    problems, seen = [], {}
    for name, pool in pools.items():
        other = seen.setdefault(pool.listen, name)
        if other != name:
            problems.append(f"pools.{name}.listen: {pool.listen} is pool '{other}'s "
                            f"already; each pool listens on its own socket")
    return problems


def _cross_checks(values):
    problems = []
    if values["states"] < values["workers"]:
        problems.append(f"states: must be at least workers ({values['workers']}), "
                        f"got {values['states']}")
    if values["clones"] is not None and values["clones"] > values["states"]:
        problems.append(f"clones: must be at most states ({values['states']}), "
                        f"got {values['clones']}")
    problems += procman.problems(values)
    if values["finishhandler"] is not None and values["finishhandler"] == values["handler"]:
        problems.append("finishhandler: must differ from handler")
    if values["memory_limit"] is not None and values["memory_limit"] <= values["maxpost"]:
        problems.append(f"memory_limit: must be larger than maxpost ({values['maxpost']} bytes): "
                        f"a state holds the whole request body")
    if not vm.available(values["lua"]):
        shipped = [choice for choice in vm.MODULES if vm.available(choice)]
        problems.append(f"lua: the installed lupa does not ship Lua {values['lua']} (no module "
                        f"{vm.MODULES[values['lua']]}); it ships: {', '.join(shipped) or 'none'}")
    if values["ffi"] and values["lua"] != "luajit":
        problems.append(f"ffi: only LuaJIT has the ffi library (lua: {values['lua']})")
    version = "5.1" if values["lua"] == "luajit" else values["lua"]
    for pattern in values["lua_cpath"]:
        match = re.search(r"/lua/(5\.\d)/", pattern)
        if match and match.group(1) != version:
            problems.append(f"lua_cpath: {pattern} holds C modules for Lua {match.group(1)}, "
                            f"but the states run Lua {version} (lua: {values['lua']}); a C "
                            f"module built for another Lua version fails to load or crashes")
    try:
        access_format.compile(values["access_format"])
    except access_format.FormatError as exc:
        problems.append(f"access_format: {exc}")
    prelude = values["prelude"]
    if prelude is not None:
        if not os.path.isfile(prelude):
            problems.append(f"prelude: no such file: {prelude}")
        elif not os.access(prelude, os.R_OK):
            problems.append(f"prelude: not readable: {prelude}")
    return problems


def load(path, overrides=None):
    """Read and check a config file; `overrides` (a mapping) wins over the file."""
    source = os.path.abspath(path)
    try:
        with open(source, encoding="utf-8") as stream:
            raw = yaml.safe_load(stream)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    raw = {} if raw is None else raw
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(source, ["the file must be a mapping of setting: value"])
        raw = {**raw, **overrides}
    return from_mapping(raw, source, os.path.dirname(source))


def defaults(base_dir=None, **overrides):
    """A Config of the defaults (plus overrides), for `luafcgid serve` and the tests."""
    return from_mapping(dict(overrides), "<defaults>", base_dir)


def keep_running(running, new, names):
    """Put `running`'s values of `names` into the re-read `new`; returns the names whose
    value differed."""
    changed = [name for name in names if getattr(new, name) != getattr(running, name)]
    for name in names:
        setattr(new, name, getattr(running, name))
    return changed
