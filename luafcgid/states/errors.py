"""The kinds of error a request can end in, spelled once (like the C original's one switch).

runtime.lua is handed LUA_KINDS (opts.kinds) and returns these very strings, so neither
side can misspell one; the responder logs and shows them (showerrors); FATAL decides
whether a state is used again. tests/test_errors.py compares what both sides know.
"""

RUNTIME = "Runtime Error"   # the script raised an error, at load time or in a handler
SYNTAX = "Syntax Error"     # the script or the prelude does not compile
FILE = "File Error"         # the script's file or directory cannot be read or entered
MEMORY = "Memory Error"     # the state reached memory_limit
TIMEOUT = "Timeout Error"   # a call ran past request_timeout
UNKNOWN = "Unknown Error"   # lupa failed outside the script's pcall
CLIENT_GONE = "Client Gone"   # the response could not be sent: no fault of the script's

# The kinds runtime.lua produces, by the names it knows them by (KIND.runtime, ...). A
# timeout is not among them: only the daemon's clock says a call ran too long (state.py).
LUA_KINDS = {"runtime": RUNTIME, "syntax": SYNTAX, "file": FILE, "memory": MEMORY,
             "unknown": UNKNOWN}

# After these a state is not trusted again: it may have stopped halfway through updating
# its globals.
FATAL = frozenset((MEMORY, TIMEOUT, UNKNOWN))
