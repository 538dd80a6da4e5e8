-- luafcgid: hello workload
function main(env, con)
  con:header("Content-Type", "text/plain")
  con:puts("Hello, world!\n")
end
