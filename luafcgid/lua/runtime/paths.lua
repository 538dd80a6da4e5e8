-- Relative names resolve against the script's directory. Where the daemon could give each
-- worker thread its own working directory (Linux) the thread is in that directory while the
-- script runs; elsewhere the process's one is shared, so Lua's file functions are rewritten
-- to put the script's directory in front of a relative name (C modules do not see this).
-- Then require's paths.

local dir, opts = ...
local type, select, sub = type, select, string.sub

if opts.rewrite_paths then
  local function resolve(name)
    if type(name) == "string" and sub(name, 1, 1) ~= "/" then
      return dir .. "/" .. name
    end
    return name
  end

  local function relative_first(fn)
    return function(name, ...) return fn(resolve(name), ...) end
  end

  local function relative_first_or_none(fn)
    return function(...)
      if select("#", ...) == 0 then return fn() end
      return fn(resolve((...)), select(2, ...))
    end
  end

  local os_rename = os.rename
  io.open = relative_first(io.open)
  io.lines = relative_first_or_none(io.lines)
  io.input = relative_first_or_none(io.input)
  io.output = relative_first_or_none(io.output)
  os.remove = relative_first(os.remove)
  os.rename = function(from, to, ...) return os_rename(resolve(from), resolve(to), ...) end
  dofile = relative_first_or_none(dofile)
  loadfile = relative_first_or_none(loadfile)
end
package.path = opts.path
package.cpath = opts.cpath
