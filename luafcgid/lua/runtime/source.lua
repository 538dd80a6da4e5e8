-- Loading source only. Lua runs bytecode unchecked: a corrupted precompiled chunk crashed both
-- LuaJIT and Lua 5.4 (SIGSEGV, the whole daemon with it). Unless `bytecode` is set, every way
-- a state loads a chunk (the script, the prelude, load, loadstring, loadfile, dofile and
-- require's Lua searcher) takes source text only. Lua 5.2+ and LuaJIT have load modes; Lua 5.1
-- has none, so there the first byte is looked at (bytecode starts with ESC, after a "#" line
-- in files). Returns how the script and the prelude are loaded: loadfile(file) -> chunk or
-- nil, message.

local opts, loadfile_absolute, io_open = ...
local type, error, concat = type, error, table.concat

local BINARY = "attempt to load a binary chunk (mode is 't')"
local byte, gsub, gmatch = string.byte, string.gsub, string.gmatch
local modes = _VERSION ~= "Lua 5.1" or jit ~= nil

-- `loader(file[, mode[, env]])` made to load text only: function(file[, env]) -> chunk or nil,
-- message. `open` opens files as `loader` finds them.
local function text_file_loader(loader, open)
  if modes then return function(file, ...) return loader(file, "t", ...) end end
  return function(file)
    local stream = file and open(file, "rb")
    if stream then
      local head = stream:read(1)
      if head == "#" then stream:read("*l") head = stream:read(1) end
      stream:close()
      if head and byte(head) == 27 then return nil, BINARY end
    end
    return loader(file)
  end
end

local load_text_file = text_file_loader(loadfile_absolute, io_open)

if not opts.bytecode then
  local load_, loadstring_, loadfile_ = load, loadstring, loadfile
  if modes then
    load = function(chunk, name, _, ...) return load_(chunk, name, "t", ...) end
  else
    load = function(reader, name)
      if type(reader) ~= "function" then return load_(reader, name) end   -- its own error
      local first = true
      return load_(function()
        local piece = reader()
        if first and piece ~= nil and piece ~= "" then
          first = false
          if byte(piece) == 27 then error(BINARY, 0) end
        end
        return piece
      end, name)
    end
    loadstring = function(s, name)
      if type(s) == "string" and byte(s) == 27 then return nil, BINARY end
      return loadstring_(s, name)
    end
  end
  if loadstring_ and modes then   -- LuaJIT: loadstring is load
    loadstring = function(s, name) return load_(s, name, "t") end
  end
  local text_loadfile = text_file_loader(loadfile_, io.open)
  loadfile = function(file, _, ...) return text_loadfile(file, ...) end
  dofile = function(file)
    local chunk, message = text_loadfile(file)
    if not chunk then error(message, 0) end
    return chunk()
  end
  -- require's searcher of Lua files, as the built-in one but loading text only
  local searchers = package.searchers or package.loaders
  local searchpath = package.searchpath or function(name, path)
    local tried = {}
    name = gsub(name, "%.", "/")
    for template in gmatch(path, "[^;]+") do
      local file = gsub(template, "%?", name)
      local stream = io_open(file, "r")
      if stream then stream:close() return file end
      tried[#tried + 1] = "\n\tno file '" .. file .. "'"
    end
    return nil, concat(tried)
  end
  searchers[2] = function(name)
    local file, tried = searchpath(name, package.path)
    if not file then return tried end
    local chunk, message = load_text_file(file)
    if not chunk then
      error("error loading module '" .. name .. "' from file '" .. file .. "':\n\t" .. message, 0)
    end
    return chunk, file
  end
end

return opts.bytecode and loadfile_absolute or load_text_file
