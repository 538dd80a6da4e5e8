"""One Lua state: a lupa runtime loaded with one script, serving one request at a time."""

import logging
import os
import time
from importlib import resources
from typing import NamedTuple

from . import vm, workdir
from .settings import BY_NAME
from .slowlog import main_thread

log = logging.getLogger("luafcgid")

LUA_DIR = str(resources.files(__package__) / "lua")
_BOOTSTRAP = (resources.files(__package__) / "lua" / "runtime.lua").read_bytes()
ENV_VERSION = 2   # env.LUAFCGID_VERSION; the original sent 1
# The most bytes of a response that cross from Lua to Python at once (runtime.lua's CHUNK).
# Three concurrent 100 MiB responses raised the daemon's peak RSS by 3 MiB with 256 KiB;
# 1 MiB took 30% less CPU per byte but raised it by 12 MiB.
CHUNK = 256 * 1024


class Outcome(NamedTuple):
    """What a call into the state's runtime (serve or finish) came to."""
    ok: bool
    payload: bytes = b""          # response bytes not yet sent (serve)
    kind: str = ""                # on failure: "Runtime Error", "Timeout Error", ...
    message: str = ""
    headers_sent: bool = False    # on failure: the headers already went out


def _outcome(values):
    """runtime.lua returns `true[, payload]` or `false, kind, message[, headers_sent]`;
    lupa hands back one value as itself and several as a tuple. This is the one place that
    reads them."""
    if type(values) is not tuple:
        values = (values,)
    if values[0]:
        return Outcome(True, values[1] if len(values) > 1 else b"")
    return Outcome(False, kind=values[1].decode(errors="replace"),
                   message=values[2].decode(errors="replace"),
                   headers_sent=len(values) > 3 and bool(values[3]))


class ScriptError(Exception):
    """A script failed to load: kind is "Syntax Error", "Runtime Error", ..."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class ScriptGone(Exception):
    """The script's file went away (or became unreadable) since it was located."""


def _deny_attributes(obj, name, is_setting):
    # Lua only ever calls the two callbacks it is given; their Python attributes
    # (__globals__, __class__, ...) would be a way out of the sandbox.
    raise AttributeError("Python attributes are not accessible from Lua")


def to_lua(value):
    """Plain Python data with str converted to bytes, since states run with encoding=None.
    Paths are bytes on POSIX: a file name that is not UTF-8 comes back as it was."""
    if isinstance(value, str):
        return os.fsencode(value)
    if isinstance(value, (list, tuple)):
        return [to_lua(item) for item in value]
    if isinstance(value, dict):
        return {to_lua(k): to_lua(v) for k, v in value.items()}
    return value


def file_signature(path):
    """What tells a changed script: nanosecond mtime, size and inode."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _Channel:
    """The Python end of a state's callbacks. Holds no reference to the runtime, so a
    discarded state is freed (and its Lua finalizers run) as soon as the pool drops it."""

    __slots__ = ("out",)

    def __init__(self):
        self.out = None

    # Both are reachable from a script (debug.getupvalue on con's methods), so they take
    # nothing but the byte strings runtime.lua passes.

    def send(self, data):
        if type(data) is not bytes:
            raise TypeError("send: expected a string")
        out = self.out
        if out is not None:
            out.write(data)

    def log(self, script, message):
        if type(script) is not bytes or type(message) is not bytes:
            raise TypeError("log: expected two strings")
        log.info("%s: %s", script.decode(errors="replace"), message.decode(errors="replace"))


class LuaState:
    """A script loaded into its own runtime. Not thread-safe: the pool lends it to one
    worker at a time."""

    def __init__(self, path, config, paths):
        """Load `path`; raises ScriptError when it does not compile or its top level fails.
        `paths` is the (package.path, package.cpath) pair for this script."""
        self.path = path
        try:
            self.signature = file_signature(path)
        except OSError as exc:
            raise ScriptGone(path) from exc
        self.prelude = config.prelude
        try:
            self.prelude_signature = file_signature(config.prelude) if config.prelude else None
        except OSError:   # the load reports it as a File Error
            self.prelude_signature = None
        self.loaded_at = time.time()
        self.last_used = time.monotonic()
        self.requests = 0
        self.busy = False
        self.stale = False
        module = vm.load(config.lua)
        self.runtime = module.LuaRuntime(encoding=None, register_eval=False,
                                         register_builtins=False, unpack_returned_tuples=True,
                                         attribute_filter=_deny_attributes,
                                         max_memory=config.memory_limit)
        self.lua_thread = main_thread(self.runtime)   # for the slowlog's traceback
        self._channel = _Channel()
        values = {name: config.lua_value(name) for name in BY_NAME}
        lua_config = self.runtime.table_from(
            to_lua({k: v for k, v in values.items() if v is not None}), recursive=True)
        opts = self.runtime.table_from(to_lua({
            "path": paths[0], "cpath": paths[1],
            "handler": config.handler, "finishhandler": config.finishhandler or "",
            "httpstatus": config.httpstatus, "contenttype": config.contenttype,
            "headers": "".join(line + "\r\n" for line in config.headers),
            "buffering": config.buffering, "timeout": config.request_timeout,
            "prelude": config.prelude or "", "libdir": LUA_DIR,
            "rewrite_paths": not workdir.per_thread(), "chunk": CHUNK,
        }))
        try:
            result = self.runtime.execute(_BOOTSTRAP, os.fsencode(path),
                                          os.fsencode(os.path.dirname(path)), lua_config,
                                          self._channel.send, self._channel.log, opts)
        except module.LuaError as exc:   # raised outside the bootstrap's pcall, e.g. no memory
            raise ScriptError("Memory Error" if isinstance(exc, module.LuaMemoryError)
                              else "Runtime Error", str(exc)) from None
        if not result[0]:
            raise ScriptError(result[1].decode(errors="replace"),
                              result[2].decode(errors="replace"))
        self._serve, self._finish = result[1], result[2]

    def changed_on_disk(self):
        """Whether the script, or the prelude it ran, changed (or went) since this state
        loaded."""
        try:
            if self.prelude and file_signature(self.prelude) != self.prelude_signature:
                return True
            return file_signature(self.path) != self.signature
        except OSError:
            return True

    def serve(self, params, body, out):
        """Run the handler; an Outcome whose payload is the response bytes not yet sent."""
        self._channel.out = out
        try:
            env = self.runtime.table_from(params)
            env[b"LUAFCGID_VERSION"] = ENV_VERSION
            if body:
                # The body's true length, as received: for a chunked request body Caddy
                # sends -1 and Apache none, and readers that trust CONTENT_LENGTH
                # (wsapi.request) would see an empty form.
                env[b"CONTENT_LENGTH"] = b"%d" % len(body)
            return _outcome(self._serve(env, body))
        finally:
            self._channel.out = None

    def finish(self):
        """Run the finish handler for the request just served; an Outcome."""
        return _outcome(self._finish())

    def close(self):
        """Drop the runtime; lupa closes the Lua state, so __gc finalizers run now."""
        self._serve = self._finish = None
        self.runtime = None
