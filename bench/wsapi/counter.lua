-- WSAPI app: counter workload, a global that persists in the app's Lua state
count = 0
return function(wsapi_env)
  count = count + 1
  local body = tostring(count) .. "\n"
  return 200, { ["Content-Type"] = "text/plain" }, coroutine.wrap(function()
    coroutine.yield(body)
  end)
end
