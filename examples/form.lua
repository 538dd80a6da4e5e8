-- A form that posts to itself; con:gets() returns the request body.
local luafcgid = require("luafcgid")
local h = luafcgid.escape_html

function main(env, con)
  con:puts([[<!DOCTYPE html><html><head><title>Form</title></head><body>
<form method="post"><input name="name" placeholder="Your name">
<button>Send</button></form>]])
  if env.REQUEST_METHOD == "POST" then
    local fields = luafcgid.parse(con:gets())
    con:puts("<p>Hello, ", h(fields.name or "stranger"), "!</p>")
  end
  con:puts("</body></html>\n")
end
