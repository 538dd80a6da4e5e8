-- A guestbook kept in SQLite through LuaSQL (Debian: apt-get install lua-sql-sqlite3).
--
-- The connection is opened once, when the state loads this script, and reused by every
-- request the state serves; when luafcgid closes the state (the script changed, eviction,
-- reload, shutdown) Lua's garbage collector closes the connection. Each state has its own
-- connection, so at most `states` (and per script `clones`) connections are open at once.
--
-- GET lists the entries, POST (name, message) adds one and redirects back to the list.
-- The database file is guestbook.sqlite3 next to this script, or $GUESTBOOK_DB.

local luasql = require("luasql.sqlite3")
local luafcgid = require("luafcgid")
local escape_html = luafcgid.escape_html

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local db_file = os.getenv("GUESTBOOK_DB") or (here .. "guestbook.sqlite3")

local sqlite = assert(luasql.sqlite3())
local db = assert(sqlite:connect(db_file))
db:execute("PRAGMA busy_timeout = 5000")   -- other states (clones) write to the same file
assert(db:execute([[CREATE TABLE IF NOT EXISTS entries (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  message TEXT NOT NULL,
  created TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)]]))

local function quote(s)
  return "'" .. db:escape(s) .. "'"
end

local function add(name, message)
  assert(db:execute(("INSERT INTO entries (name, message) VALUES (%s, %s)")
    :format(quote(name), quote(message))))
end

local function list()
  local cursor = assert(db:execute("SELECT name, message, created FROM entries ORDER BY id"))
  local rows = {}
  local row = cursor:fetch({}, "a")
  while row do
    rows[#rows + 1] = row
    row = cursor:fetch({}, "a")
  end
  cursor:close()
  return rows
end

local function field(form, name)
  local value = form[name]
  if type(value) == "table" then value = value[1] end
  value = (value or ""):gsub("^%s+", ""):gsub("%s+$", "")
  return value
end

function main(env, con)
  if env.REQUEST_METHOD == "POST" then
    local form = luafcgid.parse(con:gets())
    local name, message = field(form, "name"), field(form, "message")
    if name == "" or message == "" then
      con:header("Status", "400 Bad Request")
      con:header("Content-Type", "text/plain")
      con:puts("name and message are required\n")
      return
    end
    add(name, message)
    con:header("Status", "303 See Other")
    con:header("Location", env.REQUEST_URI or env.SCRIPT_NAME or "guestbook.lua")
    return
  end
  con:header("Content-Type", "text/html; charset=utf-8")
  con:puts("<!DOCTYPE html>\n<html><head><title>Guestbook</title></head><body>\n",
           "<h1>Guestbook</h1>\n<ul>\n")
  for _, row in ipairs(list()) do
    con:puts("<li><b>", escape_html(row.name), "</b>: ", escape_html(row.message),
             " <small>", escape_html(row.created), "</small></li>\n")
  end
  con:puts("</ul>\n<form method=\"post\">\n",
           "<input name=\"name\" placeholder=\"name\">\n",
           "<input name=\"message\" placeholder=\"message\">\n",
           "<button>Sign</button>\n</form>\n</body></html>\n")
end
