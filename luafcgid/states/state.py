"""One Lua state: a lupa runtime loaded with one script, serving one request at a time."""

import functools
import logging
import os
import threading
import time
from importlib import resources
from typing import NamedTuple

from ..settings import BY_NAME
from . import errors, hooks, vm, workdir

log = logging.getLogger("luafcgid")

_LUA = resources.files("luafcgid") / "lua"
LUA_DIR = str(_LUA)
_BOOTSTRAP = (_LUA / "runtime.lua").read_bytes()
# runtime.lua's parts, by name, read once: every new state gets them, reads no file
PARTS = {path.name[:-len(".lua")]: path.read_bytes() for path in (_LUA / "runtime").iterdir()
         if path.name.endswith(".lua")}
_compiling = threading.Lock()


@functools.lru_cache(maxsize=None)
def _compiled(module):
    """runtime.lua and its parts (by name) as bytecode of `module`'s VM, compiled once per
    process with their chunk names and lines. A new state loads them in about 20 µs where
    compiling their source took 470 (LuaJIT, this machine): half of what creating a state
    cost. This is the daemon's own code: the rule that chunks load as source only
    (runtime/source.lua) is for what scripts load."""
    with _compiling:
        dump = module.LuaRuntime(encoding=None).eval(
            "function(source, name) return string.dump(assert((loadstring or load)(source, "
            "name))) end")
        return (dump(_BOOTSTRAP, b"=runtime.lua"),
                {name: dump(source, f"=runtime/{name}.lua".encode())
                 for name, source in PARTS.items()})
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
    kind: str = ""                # on failure: one of errors.py's kinds
    message: str = ""
    headers_sent: bool = False    # on failure: the headers already went out


_new_tuple = tuple.__new__
_UNFAILED = ("", "", False)   # kind, message, headers_sent


def _outcome(values):
    """runtime.lua returns `true[, payload[, head]]` or `false, kind, message[,
    headers_sent]`; lupa hands back one value as itself and several as a tuple. This is the
    one place that reads them."""
    if type(values) is not tuple:
        values = (values,)
    if values[0]:
        if len(values) == 3:   # a whole response: built in C, not by Outcome's __new__
            return _new_tuple(Outcome, values + _UNFAILED)
        return Outcome(True, *values[1:3])
    return Outcome(False, kind=values[1].decode(errors="replace"),
                   message=values[2].decode(errors="replace"),
                   headers_sent=len(values) > 3 and bool(values[3]))


class ScriptError(Exception):
    """A script failed to load: kind is one of errors.py's."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class ScriptGone(Exception):
    """The script's file went away (or became unreadable) since it was located."""


def _lupa_failure(module, exc):
    """The Outcome of a call that failed in lupa, outside the script's pcall (which leaves the
    state untrusted): out of memory, or unknown."""
    kind = errors.MEMORY if isinstance(exc, module.LuaMemoryError) else errors.UNKNOWN
    return Outcome(False, kind=kind, message=str(exc))


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
    """What tells a changed script: nanosecond mtime, size, inode and ctime. The ctime
    moves on every write even when a tool puts the old mtime back (`cp -p`, `rsync -t
    --inplace`), which nobody but the kernel can set."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


class _Channel:
    """The Python end of a state's callbacks. Holds no reference to the runtime, so a
    discarded state is freed (and its Lua finalizers run) as soon as the pool drops it."""

    __slots__ = ("out", "sent", "refused")

    def __init__(self):
        self.out = None
        self.sent = False      # send() was called during the current request
        self.refused = False   # and `out` refused what it was given (the client went away)

    # Both are reachable from a script (debug.getupvalue on con's methods), so they take
    # nothing but the byte strings runtime.lua passes.

    def send(self, data):
        if type(data) is not bytes:
            raise TypeError("send: expected a string")
        out = self.out
        if out is not None:
            self.sent = True
            try:
                out.write(data)
            except Exception:
                self.refused = True
                raise

    def log(self, script, message):
        if type(script) is not bytes or type(message) is not bytes:
            raise TypeError("log: expected two strings")
        # the log's formatter escapes what could forge a line; the bytes that are not UTF-8
        # are kept (surrogateescape) to be written as \xNN
        log.info("%s: %s", script.decode(errors="surrogateescape"),
                 message.decode(errors="surrogateescape"))


class LuaState:
    """A script loaded into its own runtime. Not thread-safe: the pool lends it to one
    worker at a time. A call into it is watched by its worker's record (worker.py) when it
    may be interrupted: with a request_timeout, or the slowlog on."""

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
            "kinds": errors.LUA_KINDS, "parts": _compiled(module)[1],
            "shared": dictionaries and dictionaries.for_lua(ffi=config.lua == "luajit"),
            "shared_call": dictionaries and dictionaries.call,
        }), recursive=True)
        try:
            result = self.runtime.execute(_compiled(module)[0], os.fsencode(path),
                                          os.fsencode(os.path.dirname(path)), lua_config,
                                          self._channel.send, self._channel.log, opts)
        except module.LuaError as exc:   # e.g. no memory for the bootstrap itself
            failed = _lupa_failure(module, exc)
            raise ScriptError(failed.kind, failed.message) from None
        _, self._load, self._serve, self._finish, self._close, request, flag = result
        # the request thread every call runs in (and the flag thread the stop hook also
        # marks: see runtime.lua), for the deadline watcher and the slowlog
        self.threads = tuple(hooks.thread_address(text) for text in (request, flag) if text)

    def load(self, worker=None):
        """Run the prelude and the script; raises ScriptError when either fails."""
        result = self._call(worker, self._load)
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

    def serve(self, params, body, out, worker=None):
        """Run the handler with `params` (encoded FastCGI name-value pairs, which the state
        decodes) and `body`, writing to `out` what the script flushes; an Outcome."""
        channel = self._channel
        channel.out = out
        channel.sent = channel.refused = False
        try:
            return self._call(worker, self._serve, params, body)
        finally:
            channel.out = None

    def finish(self, worker=None):
        """Run the finish handler for the request just served; an Outcome."""
        return self._call(worker, self._finish)

    def _call(self, worker, function, *args):
        """function(*args) into the runtime, watched by `worker` (a worker.Worker) when it
        may be interrupted; its Outcome. A call that ran past its deadline fails with a
        Timeout Error, whatever the script made of it: its state is not used again."""
        if worker is None or not (self.timeout or worker.watched):
            try:
                return _outcome(function(*args))
            except Exception as exc:
                return self._failure(exc)
        worker.enter(self)
        try:
            result = _outcome(function(*args))
        except Exception as exc:   # (LuaJIT) the stop hook fires in runtime.lua's code too
            result = self._failure(exc)
        finally:
            worker.leave(self)
        if worker.expired:
            if self._dictionaries is not None:   # it may have stopped inside an operation
                self._dictionaries.release()
            return Outcome(False, kind=errors.TIMEOUT,
                           message=f"{self.path}: request_timeout ({self.timeout:g} s) exceeded",
                           headers_sent=self._channel.sent)
        return result

    def _failure(self, exc):
        """The Outcome of a call that raised `exc` out of the runtime: the output's own
        refusal (its client went away while the rest of a response was sent), or lupa's."""
        if self._channel.refused:
            return Outcome(False, kind=errors.CLIENT_GONE, message=str(exc))
        return _lupa_failure(self._module, exc)

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
