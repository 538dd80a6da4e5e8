"""Answering one request: find the script, borrow a state, run it, write the response.

Independent of the transport: the FastCGI connection and the development HTTP front both
hand a request (a parser.Request) here with an output object that has `write(bytes)` (send
response bytes now; raises connection.ClientGone once the client went away, which `broken`
then says) and `end(bytes)` (send these last bytes and complete the response).
"""

import logging
import os
import stat

from ..states import errors, workdir
from ..states.closer import Closer
from ..states.duty import LONG
from ..states.pool import PoolClosed, StatePool
from ..states.searchpath import search_paths
from ..states.state import LuaState, ScriptError, ScriptGone
from ..states.worker import FINISHING
from . import fastcgi as fcgi
from . import pages

log = logging.getLogger("luafcgid")

SCRIPT_FILENAME = b"SCRIPT_FILENAME"


def apache_script_filename(script):
    """The path in a SCRIPT_FILENAME as Apache sends it: mod_proxy_fcgi (with its default
    ProxyFCGIBackendType FPM) and mod_proxy_balancer send "proxy:fcgi://HOST/path" (with
    "?query" after a RewriteRule). Stripped the way php-fpm does (fpm_main.c,
    init_request_info): from the first "/" after the host, up to any "?"."""
    for prefix in (b"proxy:fcgi://", b"proxy:balancer://"):
        if script[:len(prefix)].lower() == prefix:
            slash = script.find(b"/", len(prefix))
            if slash >= 0:
                script = script[slash:]
            return script.partition(b"?")[0]
    return script


class Forbidden(Exception):
    """A script outside the configured roots or without an allowed extension."""


class Responder:
    def __init__(self, config, status=None, closer=None, on_load=None, dictionaries=None):
        """`status` (a status.Status) provides the status and ping pages, if configured;
        `closer` (a closer.Closer) closes the states the pool lets go of; on_load(path) is
        called after a state of a script loaded; the states reach `dictionaries`
        (shared.Dictionaries)."""
        self.config = config
        self._dictionaries = dictionaries
        self._closer = closer or Closer(config.lua, config.request_timeout)
        self.pool = StatePool(self._load, config.states, config.max_clones, config.retries,
                              config.max_requests, self._closer.close)
        # SCRIPT_NAME -> page (the status and ping pages), answered before any script
        self._routes = status.routes(config, self.pool) if status is not None else {}
        self._roots = self._resolve_roots()
        self._located = {}   # SCRIPT_FILENAME -> real path, emptied by every sweep
        self._successor = None
        self._per_thread = workdir.per_thread()
        self.on_load = on_load

    def retire(self, successor):
        """After a reload: requests that reach this responder late go to its successor;
        states close as their requests finish."""
        self._successor = successor
        self.pool.close()

    def _load(self, path, worker=None):
        config = self.config
        paths = search_paths(os.path.dirname(path), config.lua, config.lua_path, config.lua_cpath)
        state = LuaState(path, config, paths, self._dictionaries)
        try:
            state.load(worker)
        except BaseException:
            self._closer.close(state)   # its top level may have made finalizers
            raise
        if self.on_load is not None:
            self.on_load(path)
        return state

    def _resolve_roots(self):
        """The roots as real paths, so that a root reached through a symbolic link still
        matches. Resolved again at every sweep and when a script falls outside them: a
        deploy swaps a `current` symlink to a new release (a few lstat calls each)."""
        return tuple(os.path.join(os.path.realpath(root), "") for root in self.config.roots)

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
            self._roots = self._resolve_roots()
            if not path.startswith(self._roots):
                raise Forbidden(f"{path} is outside every root")
        try:
            st = os.stat(path)   # not opened: a missing file is a 404 whatever its name
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        if not path.endswith(self.config.extensions):
            raise Forbidden(f"{path} does not end with one of {', '.join(self.config.extensions)}")
        # a 403, as nginx and php-fpm answer, rather than a load that fails with a 500
        if not os.access(path, os.R_OK):
            raise Forbidden(f"{path} is not readable by the daemon's user")
        self._located[script] = path
        return path

    def forget_locations(self):
        self._roots = self._resolve_roots()
        self._located = {}

    def respond(self, request, out, worker):
        """Answer `request` (a parser.Request) through `out`. `worker` (the serving thread's
        worker.Worker) is told the script and watches the calls into Lua."""
        if self._routes:
            page = self._routes.get(request.name)
            if page is not None:
                out.end(page(fcgi.decode_params(request.params)))
                return
        script = worker.script = request.script
        # a script answered before: its location, and nothing about it to rewrite (a
        # SCRIPT_FILENAME in Apache's form is kept by its path)
        path = self._located.get(script)
        params = request.params
        if path is None:
            path, params = self._find(script, params, out, worker)
            if path is None:
                return
        if request.too_large:
            out.end(pages.too_large(self.config.maxpost))
            return
        if self._per_thread:   # before acquire: a state's script loads on this thread
            try:
                workdir.enter(path)
            except OSError as exc:
                self._report(errors.FILE, path, f"cannot change into its directory: {exc}", out)
                return
        config = self.config
        if config.request_timeout and hasattr(out, "abandon"):
            worker.abandon = lambda: out.abandon(self._error_page(
                errors.TIMEOUT, f"{path}: request_timeout ({config.request_timeout:g} s) "
                "exceeded; the request could not be stopped"))
        pool = self.pool
        try:
            state = pool.acquire(path, worker)
        except ScriptError as exc:
            self._report(exc.kind, path, exc.message, out)
            return
        except ScriptGone:   # deleted since its location was cached
            self._located.pop(worker.script, None)
            out.end(pages.not_found())
            return
        except PoolClosed:
            if self._successor is not None:
                self._successor.respond(request, out, worker)
            else:
                out.end(pages.unavailable())
            return
        if pool.holds.get(path, 0.0) > LONG:
            worker.off_duty()   # another worker takes connections while this one waits on Lua
        ok, payload, head, kind, message, headers_sent = state.serve(
            params, request.body, out, worker)
        if worker.measure_memory:
            worker.memory = state.memory()
        discard = not ok and kind in errors.FATAL
        finish = config.finishhandler and not discard
        if not finish:
            # released before the response goes out: a client's next request then finds
            # the state idle instead of making a clone of it
            pool.release(state, discard)
        try:
            if ok:
                # the headers leave Lua apart from the body and are joined here: 3-4% of a
                # 25 KB page's time less than in Lua (parse and respond in-process, best of
                # five)
                out.end(head + payload)
            elif out.broken and kind not in errors.FATAL:
                out.end()   # the page stopped at a write after its client left: no error
            else:
                self._report(kind, path, message, out, headers_sent)
            if finish:
                worker.stage = FINISHING
                finished = state.finish(worker)
                if not finished.ok:
                    log.error("%s in %s() of %s: %s", finished.kind, config.finishhandler,
                              path, finished.message)
                    discard = finished.kind in errors.FATAL
        finally:
            if finish:
                pool.release(state, discard)

    def _find(self, script, params, out, worker):
        """The path of a script not located before, and its params (with SCRIPT_FILENAME
        rewritten when it came in Apache's form); (None, None) when `out` was answered
        instead (no script, 403, 404)."""
        if script[:6].lower() == b"proxy:":
            script = worker.script = apache_script_filename(script)
            # the state decodes the params, and a later pair wins
            params += fcgi.encode_params(((SCRIPT_FILENAME, script),))
        if not script:
            uri = fcgi.decode_params(params).get(b"REQUEST_URI", b"?").decode(
                errors="surrogateescape")
            log.warning("request for %s has no SCRIPT_FILENAME param (is 'fastcgi_param "
                        "SCRIPT_FILENAME' in the web server's config?)", uri)
            out.end(pages.bad_request("The request names no script (SCRIPT_FILENAME)."))
            return None, None
        try:
            path = self.locate(script)
        except Forbidden as exc:
            log.warning("refused %s: %s", script.decode(errors="surrogateescape"), exc)
            out.end(pages.forbidden())
            return None, None
        if path is None:
            out.end(pages.not_found())
        return path, params

    def _report(self, kind, path, message, out, headers_sent=False):
        # Lua shortens a long script path in its messages ("...tail/of/it.lua:3:"): the
        # log line names the script in full
        log.error("%s in %s: %s", kind, path, message)
        out.end(b"" if headers_sent else self._error_page(kind, message))

    def _error_page(self, kind, message):
        if self.config.showerrors:
            return pages.server_error(kind, message)
        return pages.server_error()
