"""The seam between runtime.lua and Python: what serve() and finish() of a real Lua state
come to, success and failure alike. A bare `true` from finish() where the responder indexed
a tuple once broke the finish handler for every request."""

import pytest

from luafcgid import config
from luafcgid.request.fastcgi import encode_params
from luafcgid.states.searchpath import search_paths
from luafcgid.states.state import LuaState, Outcome


class Sink:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


SCRIPT = """
function main(env, con)
  if env.MODE == "fail" then error("handler failed") end
  if env.MODE == "flushed" then con:puts("early"); con:flush(); error("after flush") end
  con:puts("body")
end
function after(env, con)
  if env.MODE == "finish-fails" then error("finish failed") end
end
"""


@pytest.fixture
def state(tmp_path):
    def make(**settings):
        script = tmp_path / "seam.lua"
        script.write_text(SCRIPT)
        cfg = config.defaults(**settings)
        made = LuaState(str(script), cfg, search_paths(str(tmp_path), cfg.lua))
        states.append(made)
        made.load()
        return made
    states = []
    yield make
    for made in states:
        made.close()


def test_serve_succeeds_with_the_unsent_bytes(state):
    result = state().serve(encode_params({b"MODE": b"ok"}), b"", Sink())
    assert result.ok and result.kind == "" and result.payload == b"body"
    assert result.head.startswith(b"Status: 200") and result.head.endswith(b"\r\n\r\n")


def test_serve_fails_with_kind_and_message(state):
    result = state().serve(encode_params({b"MODE": b"fail"}), b"", Sink())
    assert result == Outcome(False, kind="Runtime Error", message=result.message)
    assert "handler failed" in result.message


def test_serve_failure_after_flush_says_the_headers_went_out(state):
    sink = Sink()
    result = state().serve(encode_params({b"MODE": b"flushed"}), b"", sink)
    assert not result.ok and result.headers_sent and "after flush" in result.message
    assert sink.data.endswith(b"early")


@pytest.mark.parametrize("finishhandler", [None, "after", "undefined_global"])
def test_finish_succeeds_whether_or_not_a_handler_is_defined(state, finishhandler):
    s = state(finishhandler=finishhandler)
    assert s.serve(encode_params({b"MODE": b"ok"}), b"", Sink()).ok
    assert s.finish() == Outcome(True)


def test_finish_fails_with_kind_and_message(state):
    s = state(finishhandler="after")
    assert s.serve(encode_params({b"MODE": b"finish-fails"}), b"", Sink()).ok
    result = s.finish()
    assert not result.ok and result.kind == "Runtime Error" and "finish failed" in result.message
