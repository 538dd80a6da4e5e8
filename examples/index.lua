-- The example index.
local pages = {
  {"hello.lua", "the smallest page"},
  {"counter.lua", "globals persist between requests"},
  {"form.lua", "a form posting to itself"},
  {"module.lua?a=1&a=2&b=x+y", "the luafcgid Lua module"},
  {"shared.lua", "a visit counter and a rate limit in a shared dictionary (needs shared: {site: 1M})"},
  {"guestbook.lua", "a guestbook in SQLite (LuaSQL, needs lua-sql-sqlite3), one connection per state"},
}

function main(env, con)
  con:puts("<!DOCTYPE html><html><head><title>luafcgid examples</title></head><body>",
           "<h1>luafcgid examples</h1><ul>")
  for _, page in ipairs(pages) do
    con:puts(('<li><a href="%s">%s</a>: %s</li>'):format(page[1], page[1]:match("^[^?]+"), page[2]))
  end
  con:puts("</ul></body></html>\n")
end
