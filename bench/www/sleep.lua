-- luafcgid: sleep workload, a page that waits 10 ms on something outside (as on a database)
local socket = require("socket")

function main(env, con)
  socket.select(nil, nil, 0.01)
  con:header("Content-Type", "text/plain")
  con:puts("Slept 10 ms\n")
end
