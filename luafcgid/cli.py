"""The `luafcgid` command."""

import argparse
import functools
import logging
import os
import sys

import yaml

from . import __version__, preflight
from . import config as configuration
from . import procman
from .listener import Listener, ListenError
from . import environment
from .ops import daemon, logs, privileges, signals, systemd
from .shared.dictionaries import Dictionaries
from .reference import man_page, sample_config, settings_reference
from .settings import SYSLOG_FACILITIES
from .states import vm

log = logging.getLogger("luafcgid")

DESCRIPTION = "FastCGI daemon that runs persistent, isolated Lua states for nginx."


def _override(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{key}: not a YAML value: {exc}") from None


def _common(parser):
    parser.add_argument("-c", "--config", metavar="CONFIG",
                        help="YAML config file (default: built-in defaults)")
    parser.add_argument("-s", "--set", metavar="KEY=VALUE", action="append", default=[],
                        type=_override, help="override one setting (YAML value); repeatable")


def _run_parser():
    parser = argparse.ArgumentParser(
        prog="luafcgid", description=DESCRIPTION,
        epilog="Other commands: 'luafcgid serve [DIR]' (development HTTP server), "
               "'luafcgid settings' (config reference). Setting reference: 'luafcgid settings'.")
    _common(parser)
    parser.add_argument("--daemon", action="store_true",
                        help="detach from the terminal (double fork); log to logfile only")
    parser.add_argument("--check", action="store_true",
                        help="check the config and what starting it here would meet (users, "
                             "directories, running as root), name every problem, and exit")
    parser.add_argument("-R", "--allow-to-run-as-root", action="store_true",
                        help="started as root without `user`, run pages as root anyway "
                             "(refused otherwise)")
    parser.add_argument("--version", action="version", version=f"luafcgid {__version__}")
    return parser


def _serve_parser():
    parser = argparse.ArgumentParser(
        prog="luafcgid serve",
        description="Development server: serves DIR over plain HTTP, running .lua files with "
                    "the same state pool. NOT FOR PRODUCTION: use nginx and FastCGI there.")
    parser.add_argument("dir", nargs="?", default=".", help="document root (default: .)")
    parser.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="address to listen on (default: 127.0.0.1:8080)")
    _common(parser)
    return parser


def _settings_parser():
    parser = argparse.ArgumentParser(prog="luafcgid settings",
                                     description="Print the settings reference.")
    parser.add_argument("--format", choices=("markdown", "yaml", "man"), default="markdown",
                        help="markdown reference, the sample config file, or the "
                             "luafcgid.yaml(5) manual page")
    return parser


def _read(args, machine=None, pool=None, alone=False):
    """The config named on the command line, with its -s overrides (ConfigError if bad,
    also when the Lua VM cannot do what it asks, or `machine(config)` names problems).
    `pool`: a serving process of that pool reads it, and checks only that pool's part;
    `alone`: one without a supervisor, which cannot start other pools."""
    overrides = dict(args.set)
    if args.config:
        config = configuration.load(args.config, overrides)
    else:
        config = configuration.from_mapping(overrides, "<command line>")
    if pool is not None:
        if pool not in config.pools:
            raise configuration.ConfigError(config.source, [
                f"pools: pool '{pool}' is gone from the file (the supervisor stops it)"])
        if alone and len(config.pools) > 1:
            raise configuration.ConfigError(config.source, [
                "pools: this daemon runs one process without a supervisor, which cannot start "
                "other pools; restart luafcgid to serve them"])
        config.pools = {pool: config.pools[pool]}
    problems = vm.problems(config) + (machine(config) if machine else [])
    if problems:
        raise configuration.ConfigError(config.source, problems)
    return config


def _read_or_exit(args, machine=None):
    """The config, or exit status 2 with every problem on standard error."""
    try:
        return _read(args, machine)
    except configuration.ConfigError as exc:
        for problem in exc.problems:
            print(f"luafcgid: {exc.source}: {problem}", file=sys.stderr)
        sys.exit(2)


def _reread(args, machine, pool=None, alone=False):
    """The config for a reload, with the log reopened; None (logged) when it is bad.
    `pool`: in a serving process of that pool, which reads (and opens the logs of) only
    its own pool, and gets that pool's Config; `alone`: see _read."""
    try:
        config = _read(args, machine, pool, alone)
    except configuration.ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s: %s", exc.source, problem)
        return None
    try:
        _setup_logs(config, args, pool)
        privileges.hand_pool_logs(config)
    except OSError as exc:
        log.error("reload refused: cannot open a log file: %s", exc)
        return None
    return config if pool is None else config.pools[pool]


def _setup_logs(config, args, serving=None):
    logs.setup(config.logfile, to_stderr=not args.daemon,
               pools={name: (pool.access_log, pool.slowlog)
                      for name, pool in config.pools.items()},
               syslog=(config.syslog_address, SYSLOG_FACILITIES[config.syslog_facility],
                       config.syslog_ident), serving=serving)


def run(argv):
    # these import lupa and watchdog: not needed for --help or --check
    from . import mainloop
    from .server import Server, exit_leaving_lua
    from .supervisor import Supervisor

    args = _run_parser().parse_args(argv)
    passed = systemd.listen_socket()
    machine = functools.partial(preflight.problems, allow_root=args.allow_to_run_as_root,
                                passed=passed)
    config = _read_or_exit(args, machine)
    if args.check:
        print(f"{config.source}: OK")
        return 0
    # from now on a SIGTERM waits for the main loop instead of killing a half-started
    # daemon that would leave its socket and pidfile behind
    signals.install()
    # with pools named in the file, a reload may add some: the supervisor runs them
    first = next(iter(config.pools.values()))
    supervised = bool(first.prefix) or procman.supervised(first)
    listeners = {}
    try:
        for name, pool in config.pools.items():
            # preflight passed a socket from systemd only with one pool
            listeners[name] = (Listener.passed(passed) if passed is not None
                               else Listener.bind(pool))
        if args.daemon:
            daemon.detach()
        # a lone serving process writes its pool's access log and slowlog itself
        _setup_logs(config, args, None if supervised else next(iter(config.pools)))
        privileges.hand_pool_logs(config)
        if config.pidfile:
            daemon.write_pidfile(config.pidfile)
        privileges.drop(config)
        # made here, in the process that outlives the serving ones, so that the contents
        # survive their replacement and reloads
        dictionaries = {name: Dictionaries(pool.shared) for name, pool in config.pools.items()}
        # before any thread starts; after the daemon took what it reads itself
        environment.confine(config)
    except (ListenError, privileges.PrivilegeError, OSError) as exc:
        for listener in listeners.values():   # the ones bound before the failure
            listener.close()
        print(f"luafcgid: {exc}", file=sys.stderr)
        if args.daemon:   # standard error is /dev/null now: the log file is all there is
            log.error("not started: %s", exc)
        return 1
    # the serving process(es) are made only now: the supervisor's parent serves nothing
    reread = functools.partial(_reread, args, machine)
    if supervised:
        return Supervisor(config, listeners, dictionaries, reread).run()
    (name, pool), = config.pools.items()
    if not mainloop.run(Server(pool, listeners[name],
                               functools.partial(reread, pool=name, alone=True),
                               dictionaries=dictionaries[name])):
        exit_leaving_lua()
    return 0


def serve(argv):
    from . import devserver

    args = _serve_parser().parse_args(argv)
    config = _read_or_exit(args)
    host, _, port = args.http.rpartition(":")
    logs.setup(None)
    if not os.path.isdir(args.dir):
        print(f"luafcgid serve: {args.dir} is not a directory", file=sys.stderr)
        return 2
    environment.confine(config)   # scripts see what they would behind nginx
    try:
        # the first pool's settings (the one pool, without pools in the file)
        devserver.serve(next(iter(config.pools.values())), args.dir,
                        (host or "127.0.0.1", int(port)))
    except KeyboardInterrupt:
        pass
    return 0


def settings(argv):
    args = _settings_parser().parse_args(argv)
    formats = {"markdown": settings_reference, "yaml": sample_config, "man": man_page}
    print(formats[args.format](), end="")
    return 0


COMMANDS = {"serve": serve, "settings": settings}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run(argv)
