-- 100 records of 256 bytes per request (?batch=true, JSON array). The same request every time:
-- formatted once, in init, so that wrk spends its CPU sending, not building strings.
local request_text

init = function(args)
  local items = {}
  for i = 1, 100 do
    items[i] = '{"name":"r' .. i .. '","content":"' .. string.rep("x", 256) .. '"}'
  end
  request_text = wrk.format("POST", "/load/batch?batch=true",
    { ["Host"] = wrk.headers["Host"], ["Authorization"] = wrk.headers["Authorization"],
      ["Content-Type"] = "application/json" }, "[" .. table.concat(items, ",") .. "]")
end

request = function()
  return request_text
end
