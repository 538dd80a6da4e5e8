"""The params a request is routed by, SCRIPT_FILENAME, SCRIPT_NAME and CONTENT_LENGTH, read
in Lua.

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
local decode = assert((loadstring or load)(..., "=runtime/params.lua"))()
local ONLY = {SCRIPT_FILENAME = true, SCRIPT_NAME = true, CONTENT_LENGTH = true,
              [15] = true, [11] = true, [14] = true}
return function(raw)
  local read, problem = decode(raw, ONLY)
  if read == nil then return false, problem end
  return read.SCRIPT_FILENAME or "", read.SCRIPT_NAME, read.CONTENT_LENGTH
end
"""

_thread = threading.local()


def _reader():
    module = vm.load(vm.chosen() or "luajit")
    runtime = module.LuaRuntime(encoding=None, register_eval=False, register_builtins=False,
                                unpack_returned_tuples=True)
    _thread.read = runtime.execute(_READER, PARTS["params"])
    return _thread.read


def route(params):
    """(SCRIPT_FILENAME, SCRIPT_NAME, CONTENT_LENGTH) of encoded params: b"" for a missing
    SCRIPT_FILENAME, None for another one missing. Raises ProtocolError when they are not
    name-value pairs."""
    result = (getattr(_thread, "read", None) or _reader())(params)   # a tuple made in C
    if result[0] is False:   # and what is wrong
        raise fcgi.ProtocolError(result[1].decode())
    return result
