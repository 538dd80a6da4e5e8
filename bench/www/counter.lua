-- luafcgid: counter workload, a global that persists between requests of one Lua state
count = 0
function main(env, con)
  count = count + 1
  con:header("Content-Type", "text/plain")
  con:puts(tostring(count) .. "\n")
end
