"""The one table of luafcgid's settings.

Each entry names a setting, how a YAML value is checked and converted, its default, whether a
reload (SIGHUP) applies it, and its documentation. The config loader, `luafcgid --check`, the
sample `etc/luafcgid.yaml` and the config reference (`luafcgid settings`) are all produced from
this table, so a setting is described here and nowhere else.
"""

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable

LUA_CHOICES = ("luajit", "5.1", "5.2", "5.3", "5.4", "5.5")

# A setting's scope: each pool may set its own value (the top level's is every pool's
# default), or one value serves the whole daemon and is set at the top level only.
POOL = "pool"
DAEMON = "daemon"
# php-fpm's name for its one pool, and luafcgid's when `pools` is not set
DEFAULT_POOL = "www"


class SettingError(ValueError):
    """A value that a setting does not accept; the message says what was expected."""


@dataclass(frozen=True)
class Setting:
    name: str
    convert: Callable[[Any], Any]
    default: Any               # as it would be written in YAML; converted like a given value
    doc: str
    section: str
    live: bool = True          # a SIGHUP applies it without a restart
    is_path: bool = False      # relative values resolve against the config file's directory
    example: Any = None        # shown in the sample config instead of the default
    scope: str = POOL          # POOL: a pool may change it; DAEMON: top level only


def _type_name(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def integer(minimum=None):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"expected an integer, got {_type_name(value)} ({value!r})")
        if minimum is not None and value < minimum:
            raise SettingError(f"must be at least {minimum}, got {value}")
        return value
    return convert


def number(minimum=0):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"expected a number, got {_type_name(value)} ({value!r})")
        if value < minimum:
            raise SettingError(f"must be at least {minimum}, got {value}")
        return float(value)
    return convert


def boolean(value):
    if not isinstance(value, bool):
        raise SettingError(f"expected true or false, got {_type_name(value)} ({value!r})")
    return value


def string(value):
    if not isinstance(value, str):
        raise SettingError(f"expected a string, got {_type_name(value)} ({value!r})")
    return value


def optional(convert):
    def convert_optional(value):
        return None if value is None else convert(value)
    return convert_optional


def identifier(value):
    value = string(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise SettingError(f"expected a Lua global name, got {value!r}")
    return value


def status_line(value):
    value = string(value)
    if not re.fullmatch(r"[1-5]\d\d( [^\r\n]*)?", value):
        raise SettingError(f"expected an HTTP status like '200 OK', got {value!r}")
    return value


def header_value(value):
    value = string(value)
    if "\r" in value or "\n" in value:
        raise SettingError("must not contain line breaks")
    return value


def header_lines(value):
    """The original's "Name: value\\r\\n..." string, or a YAML list of "Name: value" lines."""
    if isinstance(value, str):
        lines = [line for line in re.split(r"\r?\n", value) if line]
    elif isinstance(value, list):
        lines = value
    else:
        raise SettingError(f"expected a string or a list of header lines, got {_type_name(value)}")
    for line in lines:
        if not isinstance(line, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*", line):
            raise SettingError(f"expected header lines like 'Name: value', got {line!r}")
    return tuple(lines)


def listen_address(value):
    """A Unix socket path, or host:port (an empty host means every interface)."""
    value = string(value)
    if not value:
        raise SettingError("must not be empty")
    if "/" in value:
        return value
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(\d+)", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise SettingError(f"expected a socket path or host:port, got {value!r}")
    return value


def lua_version(value):
    if isinstance(value, float):   # YAML reads 5.1 as a number
        value = f"{value:.1f}"
    if value not in LUA_CHOICES:
        raise SettingError(f"expected one of {', '.join(LUA_CHOICES)}, got {value!r}")
    return value


def choice(*options):
    def convert(value):
        if value not in options:
            raise SettingError(f"expected one of {', '.join(options)}, got {value!r}")
        return value
    return convert


def file_mode(value):
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise SettingError(f"expected an octal mode string like \"0660\", got {value!r}")


def _bytes(value):
    """Bytes as an integer or a string with a K, M or G suffix ("64M")."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", value, re.IGNORECASE)
        if not match:
            raise SettingError(f"expected a size like \"64M\", \"512K\" or bytes, got {value!r}")
        value = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    return integer(1)(value)


def byte_size(value):
    value = _bytes(value)
    if value < 1 << 20:
        raise SettingError(f"must be at least 1M (a Lua state needs some room), got {value} bytes")
    return value


def dictionary_sizes(value):
    """Shared dictionaries: a mapping of a Lua name to a capacity ("10M")."""
    if not isinstance(value, dict):
        raise SettingError(f"expected a mapping of name: capacity like {{cache: 10M}}, got "
                           f"{_type_name(value)}")
    sizes = {}
    for name, size in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SettingError(f"{name!r}: a dictionary's name must be a Lua name (letters, "
                               f"digits and _, as in shared.cache)")
        try:
            size = _bytes(size)
        except SettingError as exc:
            raise SettingError(f"{name}: {exc}") from None
        if not 64 << 10 <= size <= 64 << 30:
            raise SettingError(f"{name}: a capacity from 64K to 64G, got {size} bytes")
        sizes[name] = size
    return sizes


def path_list(value):
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise SettingError(f"expected a list of directories, got {value!r}")
    return tuple(value)


def extension_list(value):
    if (not isinstance(value, list) or not value
            or not all(isinstance(item, str) and re.fullmatch(r"\.[^/\0]+", item) for item in value)):
        raise SettingError(f"expected a non-empty list of file name endings like [\".lua\"], "
                           f"got {value!r}")
    return tuple(value)


def search_patterns(value):
    """A list of package.path / package.cpath templates, each with a `?`."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SettingError(f"expected a list of patterns like 'lib/?.lua', got {_type_name(value)}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise SettingError(f"expected non-empty strings, got {item!r}")
        if ";" in item:
            raise SettingError(f"one pattern per list item, without ';': {item!r}")
        if "?" not in item:
            raise SettingError(f"a pattern needs a '?' where the module name goes "
                               f"(e.g. {item.rstrip('/')}/?.lua), got {item!r}")
    return tuple(value)


def ignored(value):
    return value


def address_list(value):
    """Addresses or CIDR networks ("127.0.0.1", "10.0.0.0/8", "::1"), checked; kept as
    strings so that con:config() hands Lua plain data."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SettingError(f"expected a list of addresses or networks, got {_type_name(value)}")
    networks = []
    for item in value:
        try:
            networks.append(str(ipaddress.ip_network(string(item), strict=False)))
        except ValueError:
            raise SettingError(f"expected an address or network like 10.0.0.0/8, got {item!r}") from None
    return tuple(networks)


def access_format_value(value):
    """A format string, or a mapping of JSON names to format strings; config.py compiles it
    (ops/access_format.py) and reports what is wrong in it."""
    if isinstance(value, dict):
        for name, spec in value.items():
            if not isinstance(name, str) or not isinstance(spec, str):
                raise SettingError(f"a mapping of JSON names to formats (strings), got "
                                   f"{name!r}: {spec!r}")
        return value
    return string(value)


# syslog's facilities by name, with their codes (RFC 5424)
SYSLOG_FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5,
                     "lpr": 6, "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
                     **{f"local{n}": 16 + n for n in range(8)}}


def syslog_facility(value):
    value = string(value).lower()
    if value not in SYSLOG_FACILITIES:
        raise SettingError(f"expected one of {', '.join(SYSLOG_FACILITIES)}, got {value!r}")
    return value


def client_list(value):
    """allowed_clients: null (not set), "any", or addresses and networks."""
    if value is None or value == "any":
        return value
    networks = address_list(value)
    if not networks:
        raise SettingError("expected addresses or networks, or any; an empty list would refuse "
                           "every client")
    return networks


def environment(value):
    """env: a mapping of variable names to string values."""
    if not isinstance(value, dict):
        raise SettingError(f"expected a mapping of NAME: value, got {_type_name(value)}")
    for name, item in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[^=\0]+", name):
            raise SettingError(f"expected a variable name (no '=' in it), got {name!r}")
        if not isinstance(item, str) or "\0" in item:
            raise SettingError(f"{name}: expected a string (quote numbers), got {item!r}")
    return value


def pool_map(value):
    """pools: a mapping of pool names to mappings of the settings each changes (config.py
    checks those); null (not set) means one pool of the top-level settings."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SettingError(f"expected a mapping of pool name: settings, got {_type_name(value)}")
    if not value:
        raise SettingError("empty: name at least one pool (e.g. www: {}), or leave pools out "
                           "for one pool named www")
    pools = {}
    for name, settings in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise SettingError(f"{name!r}: a pool's name is letters, digits, - and _ (as "
                               f"php-fpm's)")
        if settings is None:   # `www:` with nothing under it
            settings = {}
        if not isinstance(settings, dict):
            raise SettingError(f"{name}: expected a mapping of the settings the pool changes "
                               f"({{}} for none), got {_type_name(settings)}")
        pools[name] = settings
    return pools


def url_path(value):
    value = string(value)
    if not value.startswith("/") or any(c in value for c in "?# \r\n"):
        raise SettingError(f"expected a path like /status (no query), got {value!r}")
    return value


SETTINGS = (
    # -- listener
    Setting("listen", listen_address, "/run/luafcgid/luafcgid.sock",
            "Unix socket path, or host:port for TCP. Prefer a Unix socket; a TCP port should be "
            "bound to 127.0.0.1, never to every interface.", "listener", is_path=True),
    Setting("backlog", integer(-1), -1,
            "Listen backlog; -1 takes the system's default (net.core.somaxconn).",
            "listener"),
    Setting("listen_mode", file_mode, "0660",
            "Permissions of the Unix socket, as an octal string. The default lets the socket's "
            "owner and group (set listen_group to nginx's group) connect, and no one else.",
            "listener"),
    Setting("listen_owner", optional(string), None,
            "User that owns the Unix socket (when started as root).", "listener"),
    Setting("listen_group", optional(string), None,
            "Group that owns the Unix socket, e.g. www-data so that nginx may connect.",
            "listener", example="www-data"),
    # -- clients
    Setting("allowed_clients", client_list, None,
            "Addresses or networks (e.g. [192.0.2.10, 10.0.0.0/8]) that may connect to a TCP "
            "listen address, like php-fpm's listen.allowed_clients; other peers are closed at "
            "accept and logged once a minute per address. A listen address other than "
            "loopback needs it: luafcgid refuses to start on one without it, unless it is "
            "any, which lets every host that can reach the port run scripts. Unix sockets "
            "ignore it (listen_mode and listen_group guard them).", "clients"),
    # -- workers and the state pool
    Setting("workers", integer(1), 3,
            "Worker threads per process, each serving one request at a time; a page that "
            "waits (on a database, os.execute) holds its worker meanwhile. The threads of a "
            "process share its Python interpreter lock; Lua runs without it.", "pool",
            live=False, example=2),
    Setting("processes", integer(1), 1,
            "Serving processes sharing the listening socket, each with its own workers, "
            "states and Python interpreter lock (like php-fpm's static pool, with threads "
            "inside); one per core is a good start. workers, states and clones count per "
            "process.", "pool", live=False, example=2),
    Setting("states", integer(1), 64,
            "Most Lua states kept in the pool (at least workers). The pool grows as scripts "
            "are requested; a state costs about 90-140 KiB of memory for a hello page, "
            "230-280 KiB for a page with a 200-row table or a SQLite connection, 450 KiB for "
            "an Orbit application (python3 -m bench.pool_scale memory). Hold every page of "
            "the site: with more pages than states, rare pages are loaded again when asked for (about "
            "0.5 ms each): a site of 40 pages on 5 states served a seventh to a third of the "
            "requests per second it served on 64. The original's default was 5.", "pool"),
    Setting("clones", optional(integer(1)), None,
            "Most states holding the same script; null means as many as workers.", "pool"),
    Setting("retries", integer(0), 20,
            "Longest wait, in milliseconds, of a request whose script's states are all busy "
            "before its new clone replaces another script's idle state (only when the pool is "
            "full). It waits twice the time its script's requests typically hold a state, if "
            "that is at most this long, and not at all for slower scripts: a short wait spares "
            "reloads when several hot pages share a full pool. 0: never wait. (The original "
            "counted idle-state searches, 2 by default.)", "pool"),
    Setting("sweep", integer(1), 1000,
            "The heartbeat's period in milliseconds: every sweep, states whose script changed on "
            "disk are flushed (the file watcher flushes most at once).",
            "pool"),
    Setting("lua", lua_version, "luajit",
            "Lua VM the states run: luajit, 5.1, 5.2, 5.3, 5.4 or 5.5. One for the whole "
            "daemon, every pool's states included: a process loads one VM, and one VM per "
            "daemon keeps what the supervisor loads before it forks the same for every "
            "pool.", "pool", live=False,
            scope=DAEMON),
    Setting("lua_path", search_patterns, [],
            "The site's own Lua module patterns (e.g. lib/?.lua, or a LuaRocks tree's "
            "share/lua/5.1/?.lua and share/lua/5.1/?/init.lua), searched after the script's "
            "directory and before LUA_PATH and the system's directories. Relative patterns "
            "resolve against the config file's directory. In YAML, quote patterns in a [...] "
            "list or write one '- pattern' per line.", "modules", is_path=True),
    Setting("lua_cpath", search_patterns, [],
            "The site's own C module patterns (e.g. a LuaRocks tree's lib/lua/5.1/?.so), "
            "searched after the script's directory and before LUA_CPATH and the system's "
            "directories. Relative patterns resolve against the config file's directory.",
            "modules", is_path=True),
    Setting("prelude", optional(string), None,
            "Lua file run in every new state before its script (shared helpers, a framework's "
            "bootstrap); its globals are the script's. Its errors fail the load like the "
            "script's own; when it changes, states are reloaded like for a changed script.",
            "modules", is_path=True),
    # -- shared dictionaries
    Setting("shared", dictionary_sizes, {},
            "Shared dictionaries for scripts, as name: capacity ({cache: 10M, sessions: 50M}), "
            "like nginx's lua_shared_dict: require(\"luafcgid\").shared.cache is one store for "
            "every state, worker and process, with ngx.shared.DICT's methods. Set uses at most "
            "the capacity, evicting the least recently used keys. The contents survive a "
            "reload and the replacement of a process, not a stop.", "shared", live=False),
    # -- responses
    Setting("handler", identifier, "main",
            "Global function called for each request as handler(env, con).", "response"),
    Setting("finishhandler", optional(identifier), None,
            "Global function called as finishhandler(env, con) after the response was sent, "
            "for work the client should not wait for.", "response"),
    Setting("httpstatus", status_line, "200 OK", "Default response status.", "response"),
    Setting("contenttype", header_value, "text/html",
            "Default Content-Type; a script's own Content-Type header replaces it.", "response"),
    Setting("headers", header_lines, ["X-Powered-By: Lua"],
            "Extra headers sent with every response: a list of 'Name: value' lines, or the "
            "original's single string with \\r\\n line ends.", "response"),
    Setting("buffering", boolean, True,
            "Buffer the body until the handler returns (con:flush() sends early). Off, each "
            "con:puts() goes straight to the web server.", "response"),
    Setting("showerrors", boolean, False,
            "Show the error kind and Lua message on 500 pages (for development: they may "
            "name files and hold data); off, a plain 500 page. The log has them either way.",
            "response"),
    Setting("maxpost", integer(0), 1048576,
            "Most request-body bytes accepted; a larger body is answered 413 without running "
            "the handler, as soon as it passes this (or CONTENT_LENGTH says it will), and is "
            "not read on: the connection closes.", "response"),
    Setting("headersize", integer(0), 64,
            "Accepted for compatibility with the original's configs; buffers grow as needed.",
            "response"),
    Setting("bodysize", integer(0), 1024,
            "Accepted for compatibility with the original's configs; buffers grow as needed.",
            "response"),
    # -- process
    Setting("logfile", optional(string), "luafcgid.log",
            "Log file; syslog sends the log to the system logger (the journal, under "
            "systemd) instead, as php-fpm's error_log = syslog; null logs to standard error "
            "only.", "process", is_path=True, example="/var/log/luafcgid/luafcgid.log",
            scope=DAEMON),
    Setting("syslog_facility", syslog_facility, "daemon",
            "With logfile: syslog, the facility the lines are sent with (php-fpm's "
            "syslog.facility): daemon, user, local0 to local7, ...", "process", scope=DAEMON),
    Setting("syslog_ident", string, "luafcgid",
            "With logfile: syslog, the name every line is sent under, followed by the "
            "process id (php-fpm's syslog.ident).", "process", scope=DAEMON),
    Setting("syslog_address", string, "/dev/log",
            "With logfile: syslog, the system logger's Unix datagram socket.", "process",
            is_path=True, scope=DAEMON),
    Setting("pidfile", optional(string), None,
            "File the daemon's process id is written to.", "process", live=False,
            is_path=True, scope=DAEMON),
    Setting("shutdown_timeout", number(0), 30.0,
            "Seconds in-flight requests are given to finish on SIGTERM.", "process"),
    Setting("process_timeout", number(2), 30.0,
            "Under the supervisor (see pm): a serving process whose main loop has not "
            "reported to it for this many seconds (it does every second) is hung; the "
            "supervisor kills it and starts another.", "process"),
    Setting("user", optional(string), None,
            "When started as root: the user to run as after binding the socket and opening "
            "the logs and the pidfile (which are handed to this user), e.g. luafcgid. Started "
            "as root without it, luafcgid refuses to start (pages would run as root) unless "
            "given -R (--allow-to-run-as-root).", "process", live=False, example="luafcgid"),
    Setting("group", optional(string), None,
            "Group to run as with user; null means the user's primary group.", "process",
            live=False),
    Setting("access_log", optional(string), None,
            "Access log: one line per request, as access_format says, e.g. "
            "/var/log/luafcgid/access.log; null for none.", "process", is_path=True),
    Setting("access_format", access_format_value,
            "%{%Y-%m-%dT%H:%M:%S%z}T %m %{REQUEST_URI}e %s %O %{seconds.6}d %f",
            "The access log's line, in php-fpm's access.format codes: %R remote address, "
            "%u remote user, %m method, %r URI without the query, %q query, %Q '?' if there "
            "is a query, %s status, %O bytes sent, %f script, %l request content length, "
            "%d duration ({seconds}, {mili}, {micro}; {seconds.6} for 6 decimals), %M the "
            "Lua state's memory after the request ({bytes}, {kilo}, {mega}), %C CPU "
            "percent of the worker thread, %t start and %T end time ({strftime format}), "
            "%{NAME}e a FastCGI param, %{NAME}o a response header, %n pool, %p pid, %P "
            "parent pid, %% a percent sign. Every field is escaped. json writes one JSON "
            "object per line (time, remote_addr, method, uri, status, bytes, seconds, "
            "script, pid); a mapping of names to formats writes those.", "process"),
    Setting("slowlog", optional(string), None,
            "Log of requests that ran longer than slowlog_timeout, with the Lua traceback of "
            "where they were (Lua 5.2 to 5.5; see the manual for LuaJIT and 5.1), e.g. "
            "/var/log/luafcgid/slow.log.", "process", is_path=True),
    Setting("slowlog_timeout", optional(number(0.001)), None,
            "Seconds after which a request counts as slow and is written to the slowlog, "
            "e.g. 5; null for never.", "process"),
    Setting("clear_env", boolean, True,
            "Start scripts with an empty environment (and C modules and the programs scripts "
            "run: the serving processes' own environment is cleared), like php-fpm's "
            "clear_env, so that secrets in the daemon's environment stay out of their reach; "
            "env sets what they see. Off, they see the daemon's environment. For the whole "
            "daemon: the environment is set once, before any pool's process starts.", "process",
            live=False, scope=DAEMON),
    Setting("env", environment, {},
            "Environment variables scripts see, as NAME: value (like php-fpm's env[NAME]); "
            "a value $OTHER takes the daemon's variable OTHER (unset: not set).", "process",
            live=False, example={"PATH": "/usr/local/bin:/usr/bin:/bin"}, scope=DAEMON),
    # -- process management
    Setting("pm", choice("static", "ondemand", "dynamic"), "static",
            "How many serving processes run, with php-fpm's meanings: static runs processes "
            "all the time; ondemand runs none until a request waits, then starts one at a "
            "time, up to processes, and stops each after process_idle_timeout without "
            "requests; dynamic keeps between min_spare_processes and max_spare_processes "
            "idle, up to processes. Any pm but static, like recycling, runs the supervisor "
            "even with processes: 1.", "pm", live=False),
    Setting("start_processes", optional(integer(1)), None,
            "pm dynamic: processes started at boot; null means min_spare_processes + "
            "(max_spare_processes - min_spare_processes) / 2, as php-fpm's "
            "pm.start_servers.", "pm", live=False),
    Setting("min_spare_processes", integer(1), 1,
            "pm dynamic: when fewer processes are idle (served nothing in the last second), "
            "more start, up to processes (php-fpm's pm.min_spare_servers).", "pm"),
    Setting("max_spare_processes", integer(1), 2,
            "pm dynamic: when more processes are idle, the one idle longest is stopped, one "
            "a second (php-fpm's pm.max_spare_servers).", "pm"),
    Setting("process_idle_timeout", number(1), 10.0,
            "pm ondemand: seconds a process may serve nothing before it is stopped, one a "
            "second (php-fpm's "
            "pm.process_idle_timeout).", "pm"),
    Setting("process_max_requests", integer(0), 0,
            "Requests a serving process answers before it is replaced, against leaks "
            "memory_limit cannot see (php-fpm's pm.max_requests; max_requests counts per Lua "
            "state): its successor starts first, then it finishes the requests it holds and "
            "exits, and no request is lost. Each process draws its own limit up to 10% "
            "higher, so that processes started together are not replaced together "
            "(gunicorn's max_requests_jitter). Checked every second. 0: never.", "pm",
            live=False),
    Setting("process_max_memory", optional(byte_size), None,
            "A serving process whose resident memory (RSS) passes this (\"512M\", \"1G\" or "
            "bytes) is replaced like at process_max_requests: against leaks in C modules, "
            "lupa or Python, which memory_limit (one Lua state's heap) does not bound. "
            "Checked every second. null: never.", "pm", live=False),
    Setting("emergency_restart_threshold", integer(0), 10,
            "A serving process that exits unasked is started again at once; once this many "
            "exited within emergency_restart_interval, each restart waits, 1 s, then 2, 4 "
            "... up to 30 s, with a line in the log, until processes run for "
            "emergency_restart_interval without one exiting. (php-fpm restarts its master "
            "instead.) 0: never wait.", "pm", scope=DAEMON),
    Setting("emergency_restart_interval", number(1), 10.0,
            "Seconds: see emergency_restart_threshold.", "pm", scope=DAEMON),
    # -- status and ping pages
    Setting("status_path", optional(url_path), None,
            "SCRIPT_NAME that answers the status page instead of a script, in php-fpm's "
            "forms (pm.status_path): plain text, ?json, ?xml, ?html or ?openmetrics, and "
            "?full for every worker; luafcgid's own figures (states, scripts, stuck "
            "workers) follow php-fpm's. While it is set, each request's CPU time and its "
            "state's memory are taken (about 1 us a request).", "status",
            example="/luafcgid-status"),
    Setting("ping_path", optional(url_path), None,
            "SCRIPT_NAME that answers 'pong', for health checks.", "status",
            example="/luafcgid-ping"),
    Setting("status_allow", address_list, ["127.0.0.1", "::1"],
            "Client addresses or networks allowed to see the status and ping pages; others "
            "get 403. The address is REMOTE_ADDR, the web server's word: anyone who can "
            "connect to luafcgid's socket can send any REMOTE_ADDR, so over TCP it guards "
            "nothing without allowed_clients.", "status"),
    # -- limits
    Setting("max_params", integer(1024), 262144,
            "Most bytes of FastCGI params (the CGI environment) one request may send; more "
            "is logged and the connection closed.", "limits"),
    Setting("client_timeout", number(0.1), 30.0,
            "Seconds the web server may take to send one whole request, or to start the next "
            "one on a kept-alive connection, before the connection is closed: stalled or "
            "trickling connections cannot hold the workers.", "limits"),
    Setting("request_timeout", number(0), 0,
            "Seconds (a number: 0.5 works) each call into Lua may run: the script's load, each "
            "request, each finish handler. A watcher thread stops a script still running at its "
            "next Lua instruction (within 0.05 s), and the request gets a 500 and its state is "
            "discarded, whatever the script replaced or caught. One C function call (a sleep, "
            "a blocking read) and a __gc finalizer cannot be interrupted: see stuck_timeout. "
            "0 turns it off. With lua: luajit it turns LuaJIT's JIT compiler off in every "
            "state, since compiled loops run no hooks: scripts then run in LuaJIT's "
            "interpreter, which is slower.", "limits"),
    Setting("stuck_timeout", number(0), 1.0,
            "Seconds a call may run on past request_timeout, where it could not be stopped, "
            "before its worker counts as stuck: the request is answered 500 at once, the "
            "worker is logged and listed on the status page, and the supervisor (see pm), "
            "when it runs, replaces the process (its successor starts first, its other "
            "requests finish).", "limits"),
    Setting("bytecode", boolean, False,
            "Let states load precompiled Lua (luac or string.dump output) in scripts, the "
            "prelude, load, loadstring, loadfile, dofile and require. Off, they load source "
            "text only: Lua does not check bytecode, and a corrupted chunk crashes the whole "
            "daemon (both LuaJIT and PUC Lua).", "limits"),
    Setting("ffi", boolean, False,
            "Let scripts use LuaJIT's ffi library (lua: luajit only). It reads and writes any "
            "memory of the process, other scripts' states included, and calls any C function; "
            "off, require(\"ffi\") fails with an error saying so.", "limits"),
    Setting("memory_limit", optional(byte_size), "128M",
            "Most memory one Lua state may allocate (\"64M\", \"1G\" or bytes); a script "
            "over it gets a 500 and its state is discarded. null: no limit.", "limits"),
    Setting("max_requests", integer(0), 0,
            "Requests a state serves before it is closed and replaced by a fresh one (like "
            "php-fpm's pm.max_requests), to contain slow leaks in scripts. 0: never.", "limits"),
    Setting("roots", path_list, [],
            "Directories scripts may be run from; a SCRIPT_FILENAME outside all of them, after "
            "resolving '..' and symbolic links, gets a 403 and is never read. [] allows any "
            "directory: set it in production.", "limits", is_path=True,
            example=["/srv/www"]),
    Setting("extensions", extension_list, [".lua"],
            "File name endings a script must have (checked on the file actually run, after "
            "resolving symbolic links); others get a 403 and are never read.", "limits"),
    # -- pools
    Setting("pools", pool_map, None,
            "Several pools in one daemon, like php-fpm's [pool] sections: a mapping of pool "
            "name (letters, digits, - and _) to the settings that pool changes; the top-level "
            "settings are every pool's defaults. Each pool has its own listen, user and group, "
            "roots, processes, workers and pm, states, limits, handler, access_log and "
            "slowlog, status page and shared dictionaries; one supervisor runs them all, and "
            "SIGHUP starts a pool added to the file and stops one removed from it. The "
            "daemon-wide settings (logfile, syslog_*, pidfile, lua, clear_env, env, "
            "emergency_restart_*) are set at the top level only. null: one pool, named www "
            "(as php-fpm's).", "pools", scope=DAEMON,
            example={"www": {}, "shop": {"listen": "/run/luafcgid/shop.sock", "user": "shop",
                                         "roots": ["/srv/shop"], "handler": "run"}}),
    Setting("watchdog", ignored, None,
            "Read by the original but never used; accepted and ignored.", "compatibility"),
    Setting("maxcount", ignored, None,
            "Read by the original but never used; accepted and ignored.", "compatibility"),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
