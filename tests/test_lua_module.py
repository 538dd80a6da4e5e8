"""The luafcgid Lua module, in a real Lua state through nginx."""

from hypothesis import given, settings, strategies as st


def run(shared_stack, name, body):
    shared_stack.write(name, f"""
        local luafcgid = require("luafcgid")
        function main(env, con)
          con:header("Content-Type", "text/plain")
          {body}
        end
    """)
    status, _, out = shared_stack.get("/" + name)
    assert status == 200, out
    return out


def test_urlencode_and_urldecode(shared_stack):
    out = run(shared_stack, "m_url.lua", """
        con:puts(luafcgid.urlencode("a b&c=d/é~"), "|", luafcgid.urldecode("a+b%26c%3d%C3%A9%zz"))
    """)
    assert out == "a%20b%26c%3Dd%2F%C3%A9~|a b&c=é%zz".encode()


def test_parse_makes_lists_of_repeated_names(shared_stack):
    out = run(shared_stack, "m_parse.lua", """
        local t = luafcgid.parse("a=1&b=x+y&a=2&a=3&flag&e=")
        con:puts(luafcgid.serialize(t))
    """)
    assert out == b'{a={"1","2","3"},b="x y",e="",flag=""}'


def test_parse_does_not_print(shared_stack):
    # the original printed every pair to stdout; here nothing but the page is written
    out = run(shared_stack, "m_quiet.lua", 'luafcgid.parse("a=1&b=2") con:puts("only this")')
    assert out == b"only this"


def test_parse_cookies(shared_stack):
    shared_stack.write("m_cookies.lua", """
        local luafcgid = require("luafcgid")
        function main(env, con)
          local c = luafcgid.parse_cookies(env.HTTP_COOKIE)
          con:puts(c.session, "|", c.quoted, "|", tostring(c.missing))
        end
    """)
    _, _, out = shared_stack.get("/m_cookies.lua",
                                 headers={"Cookie": 'session=abc123; quoted="q v"; x=1'})
    assert out == b"abc123|q v|nil"


def test_escape_html(shared_stack):
    out = run(shared_stack, "m_escape.lua", """con:puts(luafcgid.escape_html([[<a href="x">'&'</a>]]))""")
    assert out == b"&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**52, 2**52) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(value=values)
def test_serialize_round_trips_through_load(shared_stack, value):
    shared_stack.write("m_roundtrip.lua", """
        local luafcgid = require("luafcgid")
        -- compares two Lua values structurally
        local function same(a, b)
          if type(a) ~= type(b) then return false end
          if type(a) ~= "table" then return a == b end
          for k, v in pairs(a) do if not same(v, b[k]) then return false end end
          for k in pairs(b) do if a[k] == nil then return false end end
          return true
        end
        function main(env, con)
          local value = (loadstring or load)("return " .. con:gets())()
          local text = luafcgid.serialize(value)
          local back = (loadstring or load)("return " .. text)()
          con:puts(same(value, back) and "same" or ("differs: " .. text))
        end
    """)
    status, _, out = shared_stack.get("/m_roundtrip.lua", method="POST",
                                      body=to_lua_literal(value).encode())
    assert (status, out) == (200, b"same")


def to_lua_literal(value):
    """A Lua constructor for `value`, written independently of serialize()."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, list):
        return "{" + ",".join(to_lua_literal(v) for v in value if v is not None) + "}"
    return "{" + ",".join(f"[{lua_string(k)}]={to_lua_literal(v)}" for k, v in value.items()) + "}"


def lua_string(text):
    return '"' + "".join(f"\\{b}" for b in text.encode()) + '"'
