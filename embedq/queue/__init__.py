"""Redis: the group's stream, entries, per-id versions, DLQ, jobs, lag, Lua scripts."""
