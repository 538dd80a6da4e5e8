"""Scripts that try to crash, freeze or outlive their deadline (issue 11): the cases of
test_isolation.py, which bench/isolation.py also times."""

HELLO = "function main(env, con) con:puts('hello') end"

# A finalizer on any VM: Lua 5.1 and LuaJIT call __gc only on userdata (newproxy).
FINALIZED = """
local function finalized(fn)
  if newproxy then
    local u = newproxy(true)
    getmetatable(u).__gc = fn
    return u
  end
  return setmetatable({}, {__gc = fn})
end
"""

# -- the deadline: ways a script may try to outlive it

BYPASSES = {
    "debug-sethook": "debug.sethook() while true do end",
    "sethook-as-message-handler":
        "while true do xpcall(function() while true do end end, debug.sethook) end",
    "error-with-looping-tostring":
        "error(setmetatable({}, {__tostring = function() while true do end end}))",
    "replaced-os-time": "os.time = function() return 0 end while true do end",
    "loop-of-os-execute": "while true do os.execute('sleep 0.05') end",
    "loop-of-string-calls": "local s = string.rep('x', 1e6) while true do s = s:upper() end",
    "coroutine-loop-of-c-calls":
        "coroutine.wrap(function() local s = string.rep('x', 1e6) "
        "while true do s = s:lower() end end)()",
}

# -- crashes: recursion through C

RECURSIONS = {
    # LuaJIT: SIGSEGV before; PUC Lua: "C stack overflow"
    "coroutine-wrap": "local function f() return coroutine.wrap(f)() end f()",
    "gsub": "local function g() return (('ab'):gsub('.', g)) end g()",
}
