-- The smallest page: main(env, con) runs for every request.
function main(env, con)
  con:header("Content-Type", "text/plain; charset=utf-8")
  con:puts("Hello, world!\n")
end
