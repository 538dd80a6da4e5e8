-- luafcgid: page workload. The data table is built once per Lua state (top level);
-- each request formats 200 rows, HTML-escapes the text, concatenates, one output call.
local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }
local function escape(s) return (string.gsub(s, "[&<>\"']", ESC)) end

ROWS = {}
for i = 1, 200 do
  ROWS[i] = { id = i, name = "item #" .. i, note = "<b>" .. i * 7 .. "</b> & \"more\" 'text'", price = i * 1.25 }
end

function main(env, con)
  local out = { "<!DOCTYPE html>\n<html><head><title>page</title></head><body>\n<table>\n" ..
                "<tr><th>id</th><th>name</th><th>note</th><th>price</th></tr>\n" }
  for i = 1, #ROWS do
    local r = ROWS[i]
    out[#out + 1] = string.format("<tr><td>%d</td><td>%s</td><td>%s</td><td>%.2f</td></tr>\n",
                                  r.id, escape(r.name), escape(r.note), r.price)
  end
  out[#out + 1] = "</table>\n</body></html>\n"
  con:puts(table.concat(out))
end
