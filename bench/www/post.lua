-- luafcgid: post workload, echoes the request body back
function main(env, con)
  con:header("Content-Type", "text/plain")
  con:puts(con:gets())
end
