"""access_format: php-fpm's access.format % codes, compiled once into a function.

compile() turns a format (a string of % codes, "json", or a mapping of JSON names to
formats) into a Format whose render(request) builds one access log line. The format is
parsed at config load and reload, never per request: each code becomes a small function, so
a request pays only for the codes its format uses, and measure_cpu / measure_memory tell the
worker whether to take a CPU clock or a state's memory at all.

`request` is the worker's record of the request just answered: it has `params` (the
FastCGI params, a mapping of bytes), `script` (the script as the responder resolved it, or
None), `status`, `sent` (bytes), `seconds`, `head` (the response's first bytes written, for
%{NAME}o), `cpu` (CPU seconds of its thread, when measured) and `memory` (the Lua state's
bytes after it, when measured).

Every field is escaped for the log (escape); the literal text of a format is checked at
load. In a JSON line each field is escaped the same way and then written as a JSON string
(a field that is one numeric code, e.g. "%s", as a JSON number), so the value a JSON reader
gets is the text line's field.
"""

import os
import re
import time
from json.encoder import encode_basestring as _quote

from .logs import escape
from ..settings import DEFAULT_POOL

# the format of the line luafcgid has always written: time, method, URI, status, bytes,
# seconds, script
DEFAULT = "%{%Y-%m-%dT%H:%M:%S%z}T %m %{REQUEST_URI}e %s %O %{seconds.6}d %f"
# access_format: json
JSON = {"time": "%{%Y-%m-%dT%H:%M:%S%z}T", "remote_addr": "%R", "method": "%m",
        "uri": "%{REQUEST_URI}e", "status": "%s", "bytes": "%O", "seconds": "%{seconds.6}d",
        "script": "%f", "pid": "%p"}
# php-fpm's %t and %T without a strftime format
CLF_TIME = "%d/%b/%Y:%H:%M:%S %z"

_TOKEN = re.compile(r"%(?:\{([^}]*)\})?(.)?", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# codes whose text is a number: written as a JSON number when a JSON field is only that
_NUMERIC = frozenset("sOdlMpPC")
_DASH = b"-"


class FormatError(ValueError):
    """A format that cannot be compiled; the message says where and why."""


class Format:
    """A compiled access_format: render(request) -> the line; what it needs measured."""

    __slots__ = ("render", "measure_cpu", "measure_memory")

    def __init__(self, render, measure_cpu, measure_memory):
        self.render = render
        self.measure_cpu = measure_cpu
        self.measure_memory = measure_memory


def _param(name, missing=_DASH):
    def field(r):
        return escape(r.params.get(name) or missing)
    return field


def _uri_path(r):
    """%r: the URI the client asked for, without its query (php-fpm's %r has no query
    either: %r%Q%q is the whole URI); SCRIPT_NAME when the web server sent no REQUEST_URI."""
    params = r.params
    uri = params.get(b"REQUEST_URI")
    if uri is None:
        return escape(params.get(b"SCRIPT_NAME") or _DASH)
    return escape(uri.partition(b"?")[0] or _DASH)


def _query_mark(r):
    return "?" if r.params.get(b"QUERY_STRING") else ""


def _script(r):
    script = r.script if r.script is not None else r.params.get(b"SCRIPT_FILENAME")
    return escape(script or _DASH)


def _header(name):
    """%{NAME}o: a response header as the script set it, the first of that name (any
    case); "-" when it has none."""
    wanted = name.lower().encode() + b":"

    def field(r):
        head = r.head or b""
        end = head.find(b"\r\n\r\n")
        for line in head[:end if end >= 0 else len(head)].split(b"\r\n"):
            if line[:len(wanted)].lower() == wanted:
                return escape(line[len(wanted):].strip() or _DASH)
        return "-"
    return field


def _duration(arg):
    unit, _, places = arg.partition(".")
    if unit in ("", "seconds"):
        scale, digits = 1.0, 3
    elif unit in ("mili", "miliseconds"):
        scale, digits = 1000.0, 3
    elif unit in ("micro", "microseconds"):
        if places:
            raise FormatError("%{micro}d is a whole number of microseconds: no decimals")
        return lambda r: "%d" % (r.seconds * 1e6)
    else:
        raise FormatError(f"%d takes seconds, mili (miliseconds) or micro (microseconds), "
                          f"got {{{arg}}}")
    if places:
        if not places.isdigit() or int(places) > 9:
            raise FormatError(f"%{{{arg}}}d: the decimals after the dot must be 0 to 9")
        digits = int(places)
    pattern = "%%.%df" % digits
    return lambda r: pattern % (r.seconds * scale)


def _memory(arg):
    divisor = {"": 1, "bytes": 1, "kilo": 1024, "kilobytes": 1024, "mega": 1 << 20,
               "megabytes": 1 << 20}.get(arg)
    if divisor is None:
        raise FormatError(f"%M takes bytes, kilo (kilobytes) or mega (megabytes), got {{{arg}}}")
    return lambda r: "%d" % ((r.memory or 0) // divisor)


def _cpu(arg):
    if arg not in ("", "total"):
        raise FormatError(f"%C takes {{total}} only (the worker thread's CPU time, user and "
                          f"system together), got {{{arg}}}")
    # php-fpm's figure: CPU time over the request's duration, in percent
    return lambda r: "%.2f" % (r.cpu / r.seconds * 100 if r.cpu and r.seconds > 0 else 0.0)


def _time(arg, at_end):
    pattern = arg or CLF_TIME
    try:
        time.strftime(pattern)
    except ValueError as exc:
        raise FormatError(f"%{{{arg}}}{'T' if at_end else 't'}: {exc}") from None
    if at_end:
        return lambda r: time.strftime(pattern)
    return lambda r: time.strftime(pattern, time.localtime(time.time() - r.seconds))


def _named(code, arg):
    if not arg:
        raise FormatError(f"%{code} needs a name in braces, e.g. %{{HTTP_HOST}}e or "
                          f"%{{Content-Type}}o")
    if code == "e":
        return _param(arg.encode())
    return _header(arg)


# code -> (field function or a maker taking the {argument}, whether it takes one)
_PLAIN = {
    "%": lambda r: "%",
    "R": _param(b"REMOTE_ADDR"),
    "m": _param(b"REQUEST_METHOD"),
    "r": _uri_path,
    "q": _param(b"QUERY_STRING", b""),
    "Q": _query_mark,
    "s": lambda r: "%d" % r.status,
    "O": lambda r: "%d" % r.sent,
    "f": _script,
    "l": _param(b"CONTENT_LENGTH", b"0"),
    "u": _param(b"REMOTE_USER", b""),
    "n": None,   # the pool's name, which compile() is given
    "p": lambda r: "%d" % os.getpid(),
    "P": lambda r: "%d" % os.getppid(),
}
_WITH_ARGUMENT = {
    "d": _duration,
    "M": _memory,
    "C": _cpu,
    "t": lambda arg: _time(arg, False),
    "T": lambda arg: _time(arg, True),
    "e": lambda arg: _named("e", arg),
    "o": lambda arg: _named("o", arg),
}


def _parse(text, pool):
    """[(literal text or None, code or None, field function or None)] of one format."""
    if _CONTROL.search(text):
        raise FormatError("control characters (a line break, a tab) are not allowed in a "
                          "format: each request is one line")
    parts = []
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() > pos:
            parts.append((text[pos:match.start()], None, None))
        arg, code = match.group(1), match.group(2)
        where = f"at {match.group()!r} (offset {match.start()})"
        if code is None or (code == "{" and arg is None):
            raise FormatError(f"{where}: a {{ without its closing }}" if code
                              else f"{where}: a % code is missing" if arg is None
                              else f"{where}: a code letter must follow the braces")
        if code in _WITH_ARGUMENT:
            try:
                field = _WITH_ARGUMENT[code](arg or "")
            except FormatError as exc:
                raise FormatError(f"{where}: {exc}") from None
        elif code in _PLAIN:
            if arg is not None:
                raise FormatError(f"{where}: %{code} takes no {{argument}}")
            field = _PLAIN[code] or (lambda r: pool)
        else:
            raise FormatError(f"{where}: unknown code %{code}; the codes are "
                              f"{' '.join('%' + c for c in sorted({**_PLAIN, **_WITH_ARGUMENT}))}")
        parts.append((None, code, field))
        pos = match.end()
    if pos < len(text):
        parts.append((text[pos:], None, None))
    return parts


def _text(parts):
    """One function for a text format: its literal text in a %-template, the fields
    filled in (a 7-field line in one % operation, not a join of 13 calls)."""
    template = "".join("%s" if field is not None else text.replace("%", "%%")
                       for text, _, field in parts)
    fields = tuple(field for _, _, field in parts if field is not None)
    if not fields:
        return lambda r: template % ()
    if len(fields) == 1:
        field = fields[0]
        return lambda r: template % field(r)
    return lambda r: template % tuple([field(r) for field in fields])


def _json(mapping, pool):
    keys, fields, every = [], [], []
    for name, spec in mapping.items():
        if not isinstance(name, str) or not isinstance(spec, str):
            raise FormatError(f"a JSON access_format maps names to formats (strings), got "
                              f"{name!r}: {spec!r}")
        try:
            parts = _parse(spec, pool)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None
        keys.append(_quote(name).replace("%", "%%") + ": %s")
        # a field that is one numeric code is a JSON number as it is; any other a string,
        # quoted by json's encoder (in C)
        fields.append((_text(parts), len(parts) == 1 and parts[0][1] in _NUMERIC))
        every += parts
    template = "{" + ", ".join(keys) + "}"
    fields = tuple(fields)

    def render(r):
        return template % tuple([field(r) if numeric else _quote(field(r))
                                 for field, numeric in fields])
    return render, every


def compile(spec, pool=DEFAULT_POOL):
    """The Format of an access_format value: a format string, "json", or a mapping of JSON
    names to format strings, for pool `pool` (%n). Raises FormatError saying what is
    wrong."""
    if spec == "json":
        spec = JSON
    if isinstance(spec, dict):
        render, parts = _json(spec, pool)
    elif isinstance(spec, str):
        parts = _parse(spec, pool)
        render = _text(parts)
    else:
        raise FormatError(f"expected a format string, \"json\" or a mapping of names to "
                          f"formats, got {type(spec).__name__}")
    codes = {code for _, code, _ in parts}
    return Format(render, "C" in codes, "M" in codes)

