-- WSAPI app: page workload, same logic as www/page.lua
local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }
local function escape(s) return (string.gsub(s, "[&<>\"']", ESC)) end

ROWS = {}
for i = 1, 200 do
  ROWS[i] = { id = i, name = "item #" .. i, note = "<b>" .. i * 7 .. "</b> & \"more\" 'text'", price = i * 1.25 }
end

return function(wsapi_env)
  local out = { "<!DOCTYPE html>\n<html><head><title>page</title></head><body>\n<table>\n" ..
                "<tr><th>id</th><th>name</th><th>note</th><th>price</th></tr>\n" }
  for i = 1, #ROWS do
    local r = ROWS[i]
    out[#out + 1] = string.format("<tr><td>%d</td><td>%s</td><td>%s</td><td>%.2f</td></tr>\n",
                                  r.id, escape(r.name), escape(r.note), r.price)
  end
  out[#out + 1] = "</table>\n</body></html>\n"
  local body = table.concat(out)
  return 200, { ["Content-Type"] = "text/html" }, coroutine.wrap(function()
    coroutine.yield(body)
  end)
end
