"""The params a request is routed by, SCRIPT_FILENAME, SCRIPT_NAME and CONTENT_LENGTH, read
in Lua; and a request without a body (a GET as nginx sends it) read whole there, its records
with them, in the same call (whole).

Every pair is checked on the way (a state's runtime.lua decodes the params with the same
walk, lua/runtime/params.lua, and trusts them). In Python the walk over the 21 params nginx sends
took 6.7 µs a request; in LuaJIT 1 µs, call included, without the interpreter lock. Each
thread reads with a Lua runtime of its own, of the VM the process runs (server.py loads it
first; luajit, the default, where nothing did).
"""

import threading

from ..states import vm
from ..states.state import PARTS
from . import fastcgi as fcgi

_READER = """
local source, first, first_kept, ends = ...
local decode = assert((loadstring or load)(source, "=runtime/params.lua"))()
local byte, sub = string.byte, string.sub
local ONLY = {SCRIPT_FILENAME = true, SCRIPT_NAME = true, CONTENT_LENGTH = true,
              [15] = true, [11] = true, [14] = true}
local KEEP = {[first] = false, [first_kept] = true}
local HEAD, ENDS = #first, #ends

local function route(raw)
  local read, problem = decode(raw, ONLY)
  if read == nil then return false, problem end
  return read.SCRIPT_FILENAME or "", read.SCRIPT_NAME, read.CONTENT_LENGTH
end

local function whole(buf, max_params)
  local keep = KEEP[sub(buf, 1, HEAD)]
  if keep == nil or #buf < HEAD + 4 + ENDS then return nil end
  local length = byte(buf, HEAD + 1) * 256 + byte(buf, HEAD + 2)
  local stop = HEAD + 4 + length + byte(buf, HEAD + 3)
  if length == 0 or length > max_params or sub(buf, stop + 1, stop + ENDS) ~= ends then
    return nil
  end
  local params = sub(buf, HEAD + 5, HEAD + 4 + length)
  local read = decode(params, ONLY)
  if read == nil then return nil end
  return keep, params, read.SCRIPT_FILENAME or "", read.SCRIPT_NAME, read.CONTENT_LENGTH,
    stop + ENDS
end

return route, whole
"""

# A request without a body, as nginx sends a GET: BEGIN_REQUEST, one PARAMS record, then the
# empty PARAMS and empty STDIN records that end them. nginx, Apache, lighttpd and Caddy number
# every request 1, so such a request begins with one of two strings (flags 0 or
# FCGI_KEEP_CONN) up to its params' length.
_FIRST = tuple(fcgi.record(fcgi.BEGIN_REQUEST, 1, fcgi.BEGIN_BODY.pack(fcgi.RESPONDER, flags))
               + fcgi.HEADER.pack(1, fcgi.PARAMS, 1, 0, 0)[:4] for flags in (0, fcgi.KEEP_CONN))
_ENDS = fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1)
# the longest buffer whole() is given: a bigger one is a body, or params that whole() would
# copy into Lua for nothing
WHOLE_MOST = 16384

_thread = threading.local()


def _readers():
    """This thread's (route, whole) reader functions, in a Lua runtime of its own."""
    module = vm.load(vm.chosen() or "luajit")
    runtime = module.LuaRuntime(encoding=None, register_eval=False, register_builtins=False,
                                unpack_returned_tuples=True)
    _thread.read, _thread.whole = runtime.execute(_READER, PARTS["params"], *_FIRST, _ENDS)


def route(params):
    """(SCRIPT_FILENAME, SCRIPT_NAME, CONTENT_LENGTH) of encoded params: b"" for a missing
    SCRIPT_FILENAME, None for another one missing. Raises ProtocolError when they are not
    name-value pairs."""
    try:
        read = _thread.read
    except AttributeError:   # the thread's first request
        _readers()
        read = _thread.read
    result = read(params)   # a tuple made in C
    if result[0] is False:   # and what is wrong
        raise fcgi.ProtocolError(result[1].decode())
    return result


def whole(buf, max_params):
    """A request without a body at the start of `buf` (bytes, at most WHOLE_MOST), read in one
    call into Lua: (keep, params, then route()'s three, where the bytes after it start); None
    when `buf` starts otherwise (or its params are not name-value pairs): record by record,
    the parser then reads it the same way, or finds what is wrong."""
    try:
        read = _thread.whole
    except AttributeError:   # the thread's first request
        _readers()
        read = _thread.whole
    return read(buf, max_params)
