-- READ: every request carries a pre-created session cookie (rotated) and hits /read.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
use_slots({ { "/read", true } })
