-- NEW: no cookie; the handler inserts a value, creating a session.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
use_slots({ { "/new", false } })
