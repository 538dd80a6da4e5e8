"""The params decode (luafcgid/lua/runtime/params.lua) on its own, in lupa's LuaJIT: the ns
one decode of nginx's 21 params takes, as every state decodes its env ("env") and as the
daemon's threads read the params a request is routed by ("only"), with every length one
byte and with a browser's User-Agent of 128 bytes or more (a four-byte value length). The
median of --rounds runs of --calls decodes each; --against CHECKOUT times that checkout's
params.lua beside, in alternating order, for a before and after in one run.

    python3 -m bench.params_decode [--rounds 9] [--calls 200000] [--against DIR]
"""

import argparse
import os
import statistics

import lupa.luajit21 as luajit

from bench.calls import nginx_params
from bench.common import REPO
from luafcgid.request import fastcgi as fcgi

PARAMS = os.path.join("luafcgid", "lua", "runtime", "params.lua")
USER_AGENT = (b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              b"Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0 OPR/105.0.0.0 Vivaldi/6.5")
TIMED = """
local decode, raw, calls, only = ...
for _ = 1, 20000 do decode(raw, only) end   -- warm: the loop is compiled
local started = os.clock()
for _ = 1, calls do decode(raw, only) end
return (os.clock() - started) / calls * 1e9
"""
ONLY = """return {SCRIPT_FILENAME = true, SCRIPT_NAME = true, CONTENT_LENGTH = true,
                  [15] = true, [11] = true, [14] = true}"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=200000)
    p.add_argument("--against", metavar="CHECKOUT", help="another checkout's params.lua beside")
    args = p.parse_args(argv)
    checkouts = {"luafcgid": REPO, **({f"at {args.against}": args.against} if args.against
                                      else {})}
    timers = {}
    for name, checkout in checkouts.items():
        # a runtime each: one's traces (LuaJIT's compiled loops) never run the other's code
        lua = luajit.LuaRuntime(encoding=None)
        with open(os.path.join(checkout, PARAMS), "rb") as stream:
            timers[name] = (lua.compile(TIMED), lua.execute(stream.read()), lua.execute(ONLY))
    short = nginx_params("/srv/www", "hello")
    params = dict(fcgi.decode_params(short))
    params[b"HTTP_USER_AGENT"] = USER_AGENT
    cases = {"21 params": short, "21, a long User-Agent": fcgi.encode_params(params)}
    print(f"ns per decode, median of {args.rounds} runs of {args.calls}")
    print(f"{'params':24}{'mode':6}" + "".join(f"{name:>24}" for name in timers))
    for case, raw in cases.items():
        for mode in ("env", "only"):
            runs = {name: [] for name in timers}
            for round_ in range(args.rounds):
                # the first to run in a round is not always the same one
                for name in sorted(timers, reverse=round_ % 2 == 1):
                    timed, decode, only = timers[name]
                    runs[name].append(timed(decode, raw, args.calls,
                                            only if mode == "only" else None))
            print(f"{case:24}{mode:6}" + "".join(f"{statistics.median(runs[name]):24.0f}"
                                                 for name in timers))


if __name__ == "__main__":
    main()
