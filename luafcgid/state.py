"""One Lua state: a lupa runtime loaded with one script, serving one request at a time."""

import logging
import os
import time
from importlib import resources

from . import vm
from .fastcgi import Params, encode_params
from .settings import BY_NAME
from .slowlog import main_thread

log = logging.getLogger("luafcgid")

LUA_DIR = str(resources.files(__package__) / "lua")
_BOOTSTRAP = (resources.files(__package__) / "lua" / "runtime.lua").read_bytes()
ENV_VERSION = 2   # env.LUAFCGID_VERSION; the original sent 1


class ScriptError(Exception):
    """A script failed to load: kind is "Syntax Error", "Runtime Error", ..."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def _deny_attributes(obj, name, is_setting):
    # Lua only ever calls the two callbacks it is given; their Python attributes
    # (__globals__, __class__, ...) would be a way out of the sandbox.
    raise AttributeError("Python attributes are not accessible from Lua")


def to_lua(value):
    """Plain Python data with str converted to bytes, since states run with encoding=None."""
    if isinstance(value, str):
        return value.encode()
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
        self.signature = file_signature(path)
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
            "prelude": config.prelude or "", "libdir": LUA_DIR, "version": ENV_VERSION,
        }))
        try:
            result = self.runtime.execute(_BOOTSTRAP, path.encode(),
                                          os.path.dirname(path).encode(), lua_config,
                                          self._channel.send, self._channel.log, opts)
        except module.LuaError as exc:   # raised outside the bootstrap's pcall, e.g. no memory
            raise ScriptError("Memory Error" if isinstance(exc, module.LuaMemoryError)
                              else "Runtime Error", str(exc)) from None
        if not result[0]:
            raise ScriptError(result[1].decode(errors="replace"),
                              result[2].decode(errors="replace"))
        self._serve, self._finish = result[1], result[2]

    def serve(self, params, body, out):
        """Run the handler with `params` (a dict; a Params one passes its raw bytes, which
        the state decodes). Returns (True, body[, headers]): the bytes not yet sent, the headers
        apart when they were not sent either; or (False, kind, message, sent)."""
        self._channel.out = out
        try:
            return self._serve(params.raw if type(params) is Params else encode_params(params),
                               body)
        finally:
            self._channel.out = None

    def finish(self):
        """Run the finish handler for the request just served: (True,) or
        (False, kind, message)."""
        return self._finish()

    def close(self):
        """Drop the runtime; lupa closes the Lua state, so __gc finalizers run now."""
        self._serve = self._finish = None
        self.runtime = None
