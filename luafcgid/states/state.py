"""One Lua state: a lupa runtime loaded with one script, serving one request at a time."""

import logging
import os
import time
from importlib import resources
from typing import NamedTuple

from ..request.fastcgi import Params, encode_params
from ..settings import BY_NAME
from . import hooks, vm, workdir

log = logging.getLogger("luafcgid")

LUA_DIR = str(resources.files("luafcgid") / "lua")
_BOOTSTRAP = (resources.files("luafcgid") / "lua" / "runtime.lua").read_bytes()
ENV_VERSION = 2   # env.LUAFCGID_VERSION; the original sent 1
# The most bytes of a response that cross from Lua to Python at once (runtime.lua's CHUNK).
# Three concurrent 100 MiB responses raised the daemon's peak RSS by 3 MiB with 256 KiB;
# 1 MiB took 30% less CPU per byte but raised it by 12 MiB.
CHUNK = 256 * 1024


class Outcome(NamedTuple):
    """What a call into the state's runtime (serve or finish) came to."""
    ok: bool
    payload: bytes = b""          # body bytes not yet sent (serve)
    head: bytes = b""             # the headers, when they were not sent either (serve)
    kind: str = ""                # on failure: "Runtime Error", "Timeout Error", ...
    message: str = ""
    headers_sent: bool = False    # on failure: the headers already went out


def _outcome(values):
    """runtime.lua returns `true[, payload[, head]]` or `false, kind, message[,
    headers_sent]`; lupa hands back one value as itself and several as a tuple. This is the
    one place that reads them."""
    if type(values) is not tuple:
        values = (values,)
    if values[0]:
        return Outcome(True, *values[1:3])
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

    __slots__ = ("out", "sent")

    def __init__(self):
        self.out = None
        self.sent = False   # send() was called during the current request

    # Both are reachable from a script (debug.getupvalue on con's methods), so they take
    # nothing but the byte strings runtime.lua passes.

    def send(self, data):
        if type(data) is not bytes:
            raise TypeError("send: expected a string")
        out = self.out
        if out is not None:
            self.sent = True
            out.write(data)

    def log(self, script, message):
        if type(script) is not bytes or type(message) is not bytes:
            raise TypeError("log: expected two strings")
        # the log's formatter escapes what could forge a line; the bytes that are not UTF-8
        # are kept (surrogateescape) to be written as \xNN
        log.info("%s: %s", script.decode(errors="surrogateescape"),
                 message.decode(errors="surrogateescape"))


class LuaState:
    """A script loaded into its own runtime. Not thread-safe: the pool lends it to one
    worker at a time. Every call into it runs inside a deadline.Window (when given one)."""

    def __init__(self, path, config, paths, dictionaries=None):
        """A runtime ready to load `path` (see load). `paths` is the (package.path,
        package.cpath) pair for this script; `dictionaries` (a shared.Dictionaries) are the
        shared dictionaries it reaches."""
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
        self.timeout = config.request_timeout
        self.hooks = hooks.for_vm(config.lua)
        self._module = module = vm.load(config.lua)
        self.runtime = module.LuaRuntime(encoding=None, register_eval=False,
                                         register_builtins=False, unpack_returned_tuples=True,
                                         attribute_filter=_deny_attributes,
                                         max_memory=config.memory_limit)
        self._channel = _Channel()
        self._dictionaries = dictionaries
        values = {name: config.lua_value(name) for name in BY_NAME}
        lua_config = self.runtime.table_from(
            to_lua({k: v for k, v in values.items() if v is not None}), recursive=True)
        opts = self.runtime.table_from(to_lua({
            "path": paths[0], "cpath": paths[1],
            "handler": config.handler, "finishhandler": config.finishhandler or "",
            "httpstatus": config.httpstatus, "contenttype": config.contenttype,
            "headers": "".join(line + "\r\n" for line in config.headers),
            "buffering": config.buffering, "timeout": config.request_timeout,
            "prelude": config.prelude or "", "libdir": LUA_DIR, "bytecode": config.bytecode,
            "rewrite_paths": not workdir.per_thread(), "chunk": CHUNK, "version": ENV_VERSION,
            "shared": dictionaries and dictionaries.for_lua(ffi=config.lua == "luajit"),
            "shared_call": dictionaries and dictionaries.call,
        }), recursive=True)
        try:
            result = self.runtime.execute(_BOOTSTRAP, os.fsencode(path),
                                          os.fsencode(os.path.dirname(path)), lua_config,
                                          self._channel.send, self._channel.log, opts)
        except module.LuaError as exc:   # e.g. no memory for the bootstrap itself
            raise ScriptError("Memory Error" if isinstance(exc, module.LuaMemoryError)
                              else "Runtime Error", str(exc)) from None
        _, self._load, self._serve, self._finish, self._close, request, flag = result
        # the request thread every call runs in (and the flag thread the stop hook also
        # marks: see runtime.lua), for the deadline watcher and the slowlog
        self.threads = tuple(hooks.thread_address(text) for text in (request, flag) if text)

    def load(self, window=None):
        """Run the prelude and the script; raises ScriptError when either fails."""
        result = _outcome(self._call(window, self._load))
        if not result.ok:
            raise ScriptError(result.kind, result.message)

    def memory(self):
        """Bytes the state's Lua heap holds now, as its memory_limit counts them (0 without
        a memory_limit, which is when lupa does not count)."""
        return self.runtime.get_memory_used() or 0

    def changed_on_disk(self):
        """Whether the script, or the prelude it ran, changed (or went) since this state
        loaded."""
        try:
            if self.prelude and file_signature(self.prelude) != self.prelude_signature:
                return True
            return file_signature(self.path) != self.signature
        except OSError:
            return True

    def serve(self, params, body, out, window=None):
        """Run the handler with `params` (a dict; a Params one passes its raw bytes, which
        the state decodes); an Outcome."""
        self._channel.out = out
        self._channel.sent = False
        try:
            raw = params.raw if type(params) is Params else encode_params(params)
            return _outcome(self._call(window, self._serve, raw, body))
        finally:
            self._channel.out = None

    def finish(self, window=None):
        """Run the finish handler for the request just served; an Outcome."""
        return _outcome(self._call(window, self._finish))

    def _call(self, window, function, *args):
        """Call into the runtime inside `window`. A call that ran past its deadline fails
        with a Timeout Error, whatever the script made of it: its state is not used again.
        Returns runtime.lua's values (see _outcome)."""
        if window is None:
            return function(*args)
        try:
            with window.running(self):
                result = function(*args)
        except self._module.LuaError:   # (LuaJIT) the stop hook fired in runtime.lua's code
            if not window.expired:
                raise
        if window.expired:
            if self._dictionaries is not None:   # it may have stopped inside an operation
                self._dictionaries.release()
            message = f"{self.path}: request_timeout ({self.timeout:g} s) exceeded"
            return False, b"Timeout Error", message.encode(), self._channel.sent
        return result

    def close(self):
        """Let go of the script's objects and collect them in a Lua call, which holds no
        interpreter lock, so that their __gc finalizers run there; then drop the runtime
        (lua_close runs what is left). Runs on the closer's thread (closer.py)."""
        close, self._close = self._close, None
        self._load = self._serve = self._finish = None
        if close is not None:
            try:
                close()
            except Exception as exc:
                log.warning("closing the state of %s: %s", self.path, exc)
        self.runtime = None
