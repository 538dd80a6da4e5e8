"""The state pool: its policy with fake states (StatePool takes create and close functions),
its promises under load with real Lua states, and a site of more pages than states through
nginx."""

import random
import threading

import pytest
from conftest import GATED_PAGE, InThread, all_in_flight_at_once, wait_for

from luafcgid import config
from luafcgid.request.fastcgi import encode_params
from luafcgid.request.responder import Responder
from luafcgid.states.pool import PoolClosed, StatePool

FOREVER = 600_000   # retries (ms): a moment longer than any test


class Fake:
    """A state as the pool sees one: something create() made for a path."""

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return f"Fake({self.path})"


class Clock:
    """The pool's clock for ages and rates, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fake_pool(states, clones=None, retries=0, max_requests=0, create=Fake):
    """(pool, the states it closed, its clock)."""
    closed = []
    clock = Clock()
    pool = StatePool(create, states, clones or states, retries, max_requests, closed.append,
                     clock)
    return pool, closed, clock


def use(pool, clock, path, at):
    """One request to `path` that ends at time `at`; its state."""
    state = pool.acquire(path)
    clock.now = at
    pool.release(state)
    return state


# -- lending ------------------------------------------------------------------------------

def test_the_most_recently_used_idle_state_is_lent_first():
    pool, _, clock = fake_pool(states=3)
    first, second = pool.acquire("a"), pool.acquire("a")   # a clone, into a free slot
    clock.now += 1
    pool.release(second)
    clock.now += 1
    pool.release(first)
    assert pool.acquire("a") is first
    assert pool.stats()["created"] == 2


def test_with_a_free_slot_a_clone_is_made_at_once():
    pool, _, _ = fake_pool(states=3, retries=FOREVER)
    busy = pool.acquire("a")
    clone = InThread(pool.acquire, "a").result(timeout=10)
    assert clone is not busy and clone.path == "a"


# -- the state least worth keeping --------------------------------------------------------

def test_the_state_idle_longest_is_replaced():
    pool, closed, clock = fake_pool(states=3)
    oldest = use(pool, clock, "a", at=1000)
    use(pool, clock, "b", at=1010)
    use(pool, clock, "c", at=1020)
    clock.now = 1030
    pool.acquire("d")
    assert closed == [oldest] and pool.evicted == 1


def test_a_scripts_request_rate_outweighs_a_more_recent_use():
    pool, closed, clock = fake_pool(states=2)
    for _ in range(50):
        hot = use(pool, clock, "hot", at=1000)
    one_off = use(pool, clock, "one-off", at=1004)
    clock.now = 1005
    pool.acquire("another")
    assert closed == [one_off]


def test_a_rate_fades_once_its_script_is_no_longer_asked_for():
    pool, closed, clock = fake_pool(states=2)
    for _ in range(50):
        hot = use(pool, clock, "hot", at=1000)
    use(pool, clock, "one-off", at=1600)   # ten minutes later
    clock.now = 1601
    pool.acquire("another")
    assert closed == [hot]


def test_a_clone_made_for_a_moment_of_concurrency_goes_before_another_scripts_state():
    pool, closed, clock = fake_pool(states=3)
    first, clone = pool.acquire("hot"), pool.acquire("hot")   # both busy at once, once
    pool.release(clone)
    pool.release(first)
    for _ in range(20):   # one at a time: the most recently used state serves them
        assert use(pool, clock, "hot", at=1000) is first
    use(pool, clock, "other", at=1000.5)   # used later than the clone, and as often
    clock.now = 1001
    pool.acquire("new")
    assert closed == [clone]


def test_inspect_lends_only_an_idle_state_and_a_look_is_not_a_use():
    pool, closed, clock = fake_pool(states=3)
    looked_at = use(pool, clock, "a", at=1000)
    use(pool, clock, "b", at=1010)
    busy = pool.acquire("c")
    assert pool.inspect(busy, lambda s: "looked") is None   # its worker's
    seen = []
    clock.now = 1020
    assert pool.inspect(looked_at, lambda s: seen.append(pool.stats()["busy"]) or "x") == "x"
    assert seen == [2]   # lent while looked at
    assert dict(pool.usage())[looked_at] == 1
    pool.release(busy)
    pool.acquire("d")   # the look did not make `looked_at` the most recently used
    assert closed == [looked_at]


def test_a_look_leaves_the_most_recently_used_state_first():
    pool, _, clock = fake_pool(states=2)
    older, newer = pool.acquire("a"), pool.acquire("a")
    clock.now = 1001
    pool.release(older)
    clock.now = 1002
    pool.release(newer)
    assert pool.inspect(older, lambda s: "looked") == "looked"
    assert pool.acquire("a") is newer


# -- when a request waits, and for how long -----------------------------------------------

def full_pool_with_a_busy_script(retries, hold=None):
    """A pool of 2 states: "a" busy, "b" idle; "a"'s one earlier request held its state for
    `hold` seconds (None: no earlier request)."""
    pool, closed, clock = fake_pool(states=2, retries=retries)
    if hold is not None:
        use(pool, clock, "a", at=clock.now + hold)
    other = use(pool, clock, "b", at=clock.now + 1)
    return pool, closed, pool.acquire("a"), other


def test_a_clone_replaces_another_scripts_idle_state_rather_than_wait():
    pool, closed, busy, other = full_pool_with_a_busy_script(retries=0)
    clone = InThread(pool.acquire, "a").result(timeout=10)
    assert clone is not busy and clone.path == "a"
    assert closed == [other] and pool.evicted == 1


def test_a_fast_script_waits_a_moment_for_its_own_state():
    # requests of "a" hold a state 100 s: the moment is 200 s, within the longest
    pool, closed, busy, _ = full_pool_with_a_busy_script(retries=FOREVER, hold=100)
    waiter = InThread(pool.acquire, "a")
    wait_for(lambda: pool.stats()["waiting"] == 1, what="the request to wait")
    pool.release(busy)
    assert waiter.result(timeout=10) is busy
    assert closed == [] and pool.evicted == 0


def test_the_moment_is_twice_the_scripts_hold_time():
    # "a" is never released: the clone is made once the moment (10 ms) is over
    pool, closed, busy, other = full_pool_with_a_busy_script(retries=FOREVER, hold=0.005)
    clone = InThread(pool.acquire, "a").result(timeout=10)
    assert clone is not busy and closed == [other]


def test_a_slow_scripts_request_does_not_wait_for_its_own_state():
    # twice its hold time is longer than the longest moment: no moment at all
    pool, closed, busy, other = full_pool_with_a_busy_script(retries=FOREVER, hold=1000)
    clone = InThread(pool.acquire, "a").result(timeout=10)
    assert clone is not busy and closed == [other]


def test_while_the_hold_time_is_unknown_the_moment_is_the_longest():
    pool, closed, busy, other = full_pool_with_a_busy_script(retries=20)
    clone = InThread(pool.acquire, "a").result(timeout=10)
    assert clone is not busy and closed == [other]


def test_a_script_with_clones_states_waits_for_one_of_them():
    pool, closed, clock = fake_pool(states=3, clones=1)
    use(pool, clock, "b", at=1000)
    busy = pool.acquire("a")
    waiter = InThread(pool.acquire, "a")
    wait_for(lambda: pool.stats()["waiting"] == 1, what="the request to wait")
    assert not waiter.done()
    pool.release(busy)
    assert waiter.result(timeout=10) is busy
    assert closed == []


def test_with_every_state_busy_a_request_waits_for_a_release():
    pool, closed, _ = fake_pool(states=2)
    pool.acquire("a")
    b = pool.acquire("b")
    waiter = InThread(pool.acquire, "c")
    wait_for(lambda: pool.stats()["waiting"] == 1, what="the request to wait")
    assert not waiter.done()
    pool.release(b)
    assert waiter.result(timeout=10).path == "c"
    assert closed == [b]


# -- keep or drop -------------------------------------------------------------------------

def test_a_discarded_state_is_closed():
    pool, closed, _ = fake_pool(states=2)
    state = pool.acquire("a")
    pool.release(state, discard=True)
    assert closed == [state] and pool.states() == [] and pool.discarded == 1


def test_a_state_is_closed_after_max_requests():
    pool, closed, clock = fake_pool(states=2, max_requests=3)
    served = [use(pool, clock, "a", at=1000) for _ in range(4)]
    assert served[:3] == [served[0]] * 3 and served[3] is not served[0]
    assert closed == [served[0]] and pool.recycled == 1


def test_flush_closes_idle_states_and_busy_ones_when_given_back():
    pool, closed, clock = fake_pool(states=2)
    busy = pool.acquire("a")
    idle = use(pool, clock, "b", at=1000)
    assert pool.flush() == 2
    assert closed == [idle] and pool.states() == [busy]
    pool.release(busy)
    assert closed == [idle, busy] and pool.states() == []


def test_a_state_flushed_while_looked_at_is_closed_when_the_look_ends():
    pool, closed, clock = fake_pool(states=2)
    state = use(pool, clock, "a", at=1000)
    assert pool.inspect(state, lambda s: pool.flush(lambda t: t is s)) == 1
    assert closed == [state] and pool.states() == []


def test_a_closed_pool_lends_nothing_and_closes_busy_states_on_release():
    pool, closed, _ = fake_pool(states=1)
    state = pool.acquire("a")
    pool.close()
    with pytest.raises(PoolClosed):
        pool.acquire("a")
    pool.release(state)
    assert closed == [state] and pool.states() == []


def test_a_script_that_fails_to_load_frees_its_slot():
    def create(path):
        if path == "bad":
            raise ValueError("cannot load")
        return Fake(path)

    pool, _, clock = fake_pool(states=1, create=create)
    for _ in range(3):
        with pytest.raises(ValueError):
            pool.acquire("bad")
    assert pool.stats()["states"] == 0
    use(pool, clock, "good", at=1000)
    assert pool.stats()["states"] == 1 and pool.stats()["scripts"] == 1


# -- with real Lua states -----------------------------------------------------------------

SCRIPT = """
busy = 0
function main(env, con)
  busy = busy + 1
  if busy > 1 then error("two requests in one state at once") end
  local x = 0
  for i = 1, tonumber(env.SPIN or "1000") do x = x + i end
  busy = busy - 1
  con:puts(x)
end
"""


class Output:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data

    def end(self, data=b""):
        self.data += data


@pytest.mark.parametrize("scripts,states,retries", [(4, 8, 2), (12, 4, 2), (12, 4, 0)])
def test_real_states_are_never_shared_and_the_limits_hold(tmp_path, scripts, states, retries):
    paths = []
    for n in range(scripts):
        (tmp_path / f"s{n}.lua").write_text(SCRIPT)
        paths.append(str(tmp_path / f"s{n}.lua"))
    pool = Responder(config.defaults(workers=4, states=states, clones=3,
                                     retries=retries)).pool
    lock = threading.Lock()
    lent, worst = set(), {"total": 0, "clones": 0}
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(100):
                path = rng.choice(paths)
                state = pool.acquire(path)
                with lock:
                    assert id(state) not in lent, "one state lent to two requests"
                    lent.add(id(state))
                    loaded = pool.states()
                    worst["total"] = max(worst["total"], len(loaded))
                    worst["clones"] = max(worst["clones"], sum(s.path == path for s in loaded))
                try:
                    result = state.serve(encode_params(
                        {b"SPIN": str(rng.randint(1, 20000)).encode()}), b"", Output())
                    assert result.ok, result
                finally:
                    with lock:
                        lent.discard(id(state))
                    pool.release(state)
        except Exception as exc:   # reported below, in the test's thread
            errors.append(exc)

    workers = [InThread(work, n) for n in range(4)]
    for w in workers:
        w.result(timeout=120)
    assert not errors, errors
    assert worst["total"] <= states and worst["clones"] <= 3
    stats = pool.stats()
    assert stats["busy"] == 0 and stats["loading"] == 0
    if scripts > states:
        assert stats["evicted"] > 0
    pool.close()


# -- through nginx --------------------------------------------------------------------------

def test_a_page_of_a_site_larger_than_the_pool_serves_its_requests_at_once(stack):
    """Default settings, a pool full of other pages: `workers` requests to one page are all
    in it at once, instead of queueing on the page's one busy state (on main they queued:
    3 requests of 0.3 s took 0.90 s)."""
    defaults = config.defaults()
    s = stack()
    for n in range(defaults.states):
        s.write(f"page{n}.lua", f'function main(env, con) con:puts("{n}") end\n')
        assert s.get(f"/page{n}.lua")[2] == str(n).encode()
    s.write("gated.lua", GATED_PAGE)
    all_in_flight_at_once(s, "gated.lua", defaults.workers)
