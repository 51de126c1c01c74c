-- One 256-byte text record per request. STREAMS=1 → all into one stream; else spread.
local streams = tonumber(os.getenv("STREAMS") or "1")
local body = string.rep("x", 256)
local counter = 0
request = function()
  counter = counter + 1
  local s = (streams > 1) and (counter % streams) or 0
  return wrk.format("POST", "/load/s" .. s .. "/r" .. counter,
    { ["Host"] = wrk.headers["Host"], ["Authorization"] = wrk.headers["Authorization"],
      ["Content-Type"] = "text/plain" }, body)
end
