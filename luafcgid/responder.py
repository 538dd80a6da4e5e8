"""Answering one request: find the script, borrow a state, run it, write the response.

Independent of the transport: the FastCGI connection and the development HTTP front both
hand a request's params and body here with an output object that has `write(bytes)` (send
response bytes now) and `end(bytes)` (send these last bytes and complete the response).
"""

import logging
import os
import stat

from . import pages, vm
from .pool import PoolClosed, StatePool
from .searchpath import search_paths
from .state import LuaState, ScriptError

log = logging.getLogger("luafcgid")


# Errors after which a state is not trusted again: it may have stopped halfway through
# updating its globals.
_FATAL = frozenset(("Memory Error", "Timeout Error"))


class Forbidden(Exception):
    """A script outside the configured roots or without an allowed extension."""


class Responder:
    def __init__(self, config, status=None):
        """`status` (a status.Status) provides the status and ping pages, if configured."""
        self.config = config
        self._pages = status.pages(config) if status is not None else {}
        self.pool = StatePool(self._load, config.states, config.max_clones, config.retries,
                              config.max_requests)
        # resolved once, so a root reached through a symbolic link still matches
        self._roots = tuple(os.path.join(os.path.realpath(root), "") for root in config.roots)
        self._located = {}   # SCRIPT_FILENAME -> real path, emptied by every sweep
        self._successor = None
        self.on_load = None   # called with a script's path after a state of it loaded

    def retire(self, successor):
        """After a reload: requests that reach this responder late go to its successor;
        states close as their requests finish."""
        self._successor = successor
        self.pool.close()

    def _load(self, path):
        config = self.config
        paths = search_paths(os.path.dirname(path), config.lua, config.lua_path, config.lua_cpath)
        state = LuaState(path, config, paths)
        if self.on_load is not None:
            self.on_load(path)
        return state

    def locate(self, script):
        """The real path of a non-empty regular file named by `script`, or None; raises
        Forbidden, before the file is opened, when confinement does not allow it."""
        path = self._located.get(script)
        if path is not None:
            return path
        try:
            path = os.path.realpath(os.fsdecode(script))
        except ValueError:   # a NUL byte in the name
            return None
        if self._roots and not path.startswith(self._roots):
            raise Forbidden(f"{path} is outside every root")
        try:
            st = os.stat(path)   # not opened: a missing file is a 404 whatever its name
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        if not path.endswith(self.config.extensions):
            raise Forbidden(f"{path} does not end with one of {', '.join(self.config.extensions)}")
        self._located[script] = path
        return path

    def forget_locations(self):
        self._located = {}

    def respond(self, params, body, out, body_too_large=False, worker=None):
        """`worker` (a metrics.WorkerStats) is told which state runs the request."""
        if self._pages:
            page = self._pages.get(params.get(b"SCRIPT_NAME"))
            if page is not None:
                out.end(page(params))
                return
        script = params.get(b"SCRIPT_FILENAME", b"")
        if not script:
            uri = params.get(b"REQUEST_URI", b"?").decode(errors="replace")
            log.warning("request for %s has no SCRIPT_FILENAME param (is 'fastcgi_param "
                        "SCRIPT_FILENAME' in the web server's config?)", uri)
            out.end(pages.bad_request("The request names no script (SCRIPT_FILENAME)."))
            return
        try:
            path = self.locate(script)
        except Forbidden as exc:
            log.warning("refused %s: %s", script.decode(errors="replace"), exc)
            out.end(pages.forbidden())
            return
        if path is None:
            out.end(pages.not_found(script.decode(errors="replace")))
            return
        if body_too_large:
            out.end(pages.too_large(self.config.maxpost))
            return
        try:
            state = self.pool.acquire(path)
        except ScriptError as exc:
            self._report(exc.kind, exc.message, out)
            return
        except PoolClosed:
            if self._successor is not None:
                self._successor.respond(params, body, out, body_too_large, worker)
            else:
                out.end(pages.unavailable())
            return
        discard = False
        if worker is not None:
            worker.state = state
        try:
            result = state.serve(params, body, out)
            if result[0]:
                # (True, body, headers): joined here, 3-4% of a 25 KB page's time less than
                # in Lua (parse and respond in-process, best of five)
                out.end(result[2] + result[1] if len(result) > 2 else result[1])
            else:
                _, kind, message, sent = result
                kind, message = kind.decode(), message.decode(errors="replace")
                discard = kind in _FATAL
                self._report(kind, message, out, headers_sent=sent)
            if self.config.finishhandler and not discard:
                finished = state.finish()
                if not finished[0]:
                    kind = finished[1].decode()
                    log.error("%s in %s() of %s: %s", kind, self.config.finishhandler, path,
                              finished[2].decode(errors="replace"))
                    discard = kind in _FATAL
        except Exception as exc:   # a lupa-level failure outside the script's pcall
            discard = True
            memory = isinstance(exc, vm.load(self.config.lua).LuaMemoryError)
            self._report("Memory Error" if memory else "Unknown Error", f"{path}: {exc}", out)
        finally:
            if worker is not None:
                worker.state = None
            self.pool.release(state, discard)

    def _report(self, kind, message, out, headers_sent=False):
        log.error("%s: %s", kind, message)
        if headers_sent:
            out.end(b"")
        elif self.config.showerrors:
            out.end(pages.server_error(kind, message))
        else:
            out.end(pages.server_error())
