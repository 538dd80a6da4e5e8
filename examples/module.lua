-- The luafcgid module: query strings, cookies, HTML escaping and serialization.
local luafcgid = require("luafcgid")

function main(env, con)
  local query = luafcgid.parse(env.QUERY_STRING)
  local cookies = luafcgid.parse_cookies(env.HTTP_COOKIE)
  con:header("Content-Type", "text/plain")
  con:header("Set-Cookie", "visited=yes")
  con:puts("query:   ", luafcgid.serialize(query), "\n")
  con:puts("cookies: ", luafcgid.serialize(cookies), "\n")
  con:puts("escaped: ", luafcgid.escape_html("<b>\"Tom & Jerry\"</b>"), "\n")
  con:puts("encoded: ", luafcgid.urlencode("a b&c=d/é"), "\n")
end
