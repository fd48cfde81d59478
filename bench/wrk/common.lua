-- Shared by read.lua, write.lua, new.lua and mixed.lua.
--
-- COOKIES names a file of pre-created session cookies (`name=value`, one a
-- line). Each thread walks the pool from its own offset, one cookie per
-- request, so concurrent requests carry different sessions. Requests are
-- formatted once in init(), not per request, to keep wrk's own CPU low.
-- done() prints one `RESULT key=value ...` line for bench/run.sh.
-- ROUTE_READ, ROUTE_WRITE and ROUTE_NEW, when set, replace the paths /read,
-- /write and /new (an app whose routes are named otherwise).

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- `slots` is a list of {path, with_cookie}; request k uses slot k % #slots.
function use_slots(slots)
  local reqs, n, k
  function init(args)
    local cookies = {}
    local path = os.getenv("COOKIES")
    if path then
      for line in io.lines(path) do
        if line ~= "" then cookies[#cookies + 1] = line end
      end
    end
    if #cookies == 0 then cookies[1] = "" end
    n = #cookies
    reqs = {}
    for s, slot in ipairs(slots) do
      local path = os.getenv("ROUTE_" .. slot[1]:sub(2):upper())
      if path and path ~= "" then slot[1] = path end
      reqs[s] = {}
      for c = 1, (slot[2] and n or 1) do
        local headers = slot[2] and { Cookie = cookies[c] } or {}
        reqs[s][c] = wrk.format("GET", slot[1], headers)
      end
    end
    k = tid * 7919 -- threads start far apart in the pool
  end
  function request()
    k = k + 1
    local slot = reqs[k % #slots + 1]
    return slot[#slot == 1 and 1 or (k % n + 1)]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d max_us=%d socket_errors=%d non2xx=%d\n",
    summary.requests, summary.duration, summary.requests / summary.duration * 1e6,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
