"""luafcgid: a FastCGI daemon that runs persistent Lua states."""

__version__ = "2.0.0"
