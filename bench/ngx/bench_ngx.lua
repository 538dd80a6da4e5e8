-- nginx embedded Lua (content_by_lua_block): the four workloads, same logic as www/*.lua.
-- Loaded once per nginx worker (lua_code_cache on), so module state persists like a Lua state.
local _M = {}

function _M.hello()
  ngx.header["Content-Type"] = "text/plain"
  ngx.print("Hello, world!\n")
end

local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }
local function escape(s) return (string.gsub(s, "[&<>\"']", ESC)) end

local ROWS = {}
for i = 1, 200 do
  ROWS[i] = { id = i, name = "item #" .. i, note = "<b>" .. i * 7 .. "</b> & \"more\" 'text'", price = i * 1.25 }
end

function _M.page()
  local out = { "<!DOCTYPE html>\n<html><head><title>page</title></head><body>\n<table>\n" ..
                "<tr><th>id</th><th>name</th><th>note</th><th>price</th></tr>\n" }
  for i = 1, #ROWS do
    local r = ROWS[i]
    out[#out + 1] = string.format("<tr><td>%d</td><td>%s</td><td>%s</td><td>%.2f</td></tr>\n",
                                  r.id, escape(r.name), escape(r.note), r.price)
  end
  out[#out + 1] = "</table>\n</body></html>\n"
  ngx.header["Content-Type"] = "text/html"
  ngx.print(table.concat(out))
end

function _M.post()
  ngx.req.read_body()
  ngx.header["Content-Type"] = "text/plain"
  ngx.print(ngx.req.get_body_data() or "")
end

local count = 0
function _M.counter()
  count = count + 1
  ngx.header["Content-Type"] = "text/plain"
  ngx.print(tostring(count) .. "\n")
end

return _M
