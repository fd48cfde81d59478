-- MIXED, in every 100 requests: 90 reads and 9 writes (rotated cookies), 1 new session.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local slots = {}
for i = 0, 99 do
  if i == 0 then
    slots[#slots + 1] = { "/new", false }
  elseif i % 10 == 5 and i < 95 then -- 5, 15, ..., 85: nine writes spread out
    slots[#slots + 1] = { "/write", true }
  else
    slots[#slots + 1] = { "/read", true }
  end
end
use_slots(slots)
