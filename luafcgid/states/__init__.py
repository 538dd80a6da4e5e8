"""The Lua states: the pool, one state, the VM, their deadlines, closing and reloading."""
