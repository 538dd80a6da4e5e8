-- WSAPI app: post workload, echoes the request body back
return function(wsapi_env)
  local len = tonumber(wsapi_env.CONTENT_LENGTH) or 0
  local body = len > 0 and (wsapi_env.input:read(len) or "") or ""
  return 200, { ["Content-Type"] = "text/plain" }, coroutine.wrap(function()
    coroutine.yield(body)
  end)
end
