-- WSAPI app (wsapi.fcgi launcher): hello workload
return function(wsapi_env)
  return 200, { ["Content-Type"] = "text/plain" }, coroutine.wrap(function()
    coroutine.yield("Hello, world!\n")
  end)
end
