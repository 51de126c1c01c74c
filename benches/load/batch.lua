-- 100 records of 256 bytes per request (?batch=true, JSON array).
local items = {}
for i = 1, 100 do
  items[i] = '{"name":"r' .. i .. '","content":"' .. string.rep("x", 256) .. '"}'
end
local body = "[" .. table.concat(items, ",") .. "]"
request = function()
  return wrk.format("POST", "/load/batch?batch=true",
    { ["Host"] = wrk.headers["Host"], ["Authorization"] = wrk.headers["Authorization"],
      ["Content-Type"] = "application/json" }, body)
end
