-- One 256-byte text record per request. STREAMS=1 → all into one stream; else spread.
-- The requests are formatted once, up front, and sent in turn: building each one in Lua
-- (wrk.format per request) cost wrk about a third of the server's CPU per request, CPU the
-- server and PostgreSQL share on a small machine. Names repeat after `count` requests, which
-- the spec allows (reading a name gives the latest record with it).
local streams = tonumber(os.getenv("STREAMS") or "1")
local body = string.rep("x", 256)
local count = math.max(streams, 10000)
local requests = {}
local counter = 0

init = function(args)
  local headers = { ["Host"] = wrk.headers["Host"], ["Authorization"] = wrk.headers["Authorization"],
                    ["Content-Type"] = "text/plain" }
  for i = 1, count do
    local s = (streams > 1) and (i % streams) or 0
    requests[i] = wrk.format("POST", "/load/s" .. s .. "/r" .. i, headers, body)
  end
end

request = function()
  counter = counter % count + 1
  return requests[counter]
end
