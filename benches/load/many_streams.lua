-- One 256-byte append to each of STREAMS (default 100,000) distinct top-level streams, then
-- cheap `GET /live` requests until wrk stops (memory.sh stops it once every stream exists).
local streams = tonumber(os.getenv("STREAMS") or "100000")
local body = string.rep("x", 256)
local counter = 0
local thread_id = 0
local threads = 0
setup = function(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end
init = function()
  counter = thread_id
end
request = function()
  local n = counter
  counter = counter + 2 -- two wrk threads: even and odd stream numbers
  if n < streams then
    return wrk.format("POST", "/m" .. n .. "/r",
      { ["Host"] = wrk.headers["Host"], ["Authorization"] = wrk.headers["Authorization"],
        ["Content-Type"] = "text/plain" }, body)
  end
  return wrk.format("GET", "/live", { ["Host"] = "localhost" })
end
