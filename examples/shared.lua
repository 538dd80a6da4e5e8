-- A shared dictionary is one store for every state, worker and process of the daemon (like
-- OpenResty's ngx.shared.DICT): here a visit counter and a simple rate limit. It needs the
-- setting shared: {site: 1M}, e.g. luafcgid serve examples -s 'shared={site: 1M}'.
local site = require("luafcgid").shared.site

local LIMIT, WINDOW = 10, 10   -- at most LIMIT requests per client in WINDOW seconds

function main(env, con)
  con:header("Content-Type", "text/plain")
  if site == nil then
    con:puts("This page needs the shared dictionary 'site': set shared: {site: 1M}\n",
             "(luafcgid serve examples -s 'shared={site: 1M}').\n")
    return
  end
  -- a counter per client that starts with its window and expires with it
  local client = "requests:" .. (env.REMOTE_ADDR or "?")
  local used = assert(site:incr(client, 1, 0, WINDOW))
  if used > LIMIT then
    con:header("Status", "429 Too Many Requests")
    con:header("Retry-After", math.ceil(site:ttl(client) or WINDOW))
    con:puts("Slow down: more than ", LIMIT, " requests in ", WINDOW, " seconds.\n")
    return
  end
  local visits = assert(site:incr("visits", 1, 0))
  con:puts("Visit number ", visits, ", counted across every worker and process.\n",
           "You used ", used, " of ", LIMIT, " requests in this ", WINDOW, "-second window.\n")
end
