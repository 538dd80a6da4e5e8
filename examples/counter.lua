-- Globals persist between requests served by the same Lua state: the top level runs once,
-- when the state is loaded, and main() runs per request.
count = 0
loaded_at = os.date("!%Y-%m-%d %H:%M:%S UTC")

function main(env, con)
  count = count + 1
  con:header("Content-Type", "text/plain")
  con:puts("This state was loaded at ", loaded_at, " and has served ", count,
           " request(s).\n")
end
