"""The state pool with real Lua states: limits, eviction, exclusivity, no deadlock."""

import os
import random
import threading

import pytest
from conftest import wait_for

from luafcgid import config
from luafcgid.request.fastcgi import encode_params
from luafcgid.request.responder import Responder
from luafcgid.states.pool import PoolClosed
from luafcgid.states.state import ScriptError

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


def make_pool(tmp_path, scripts, **settings):
    for n in range(scripts):
        (tmp_path / f"s{n}.lua").write_text(SCRIPT)
    responder = Responder(config.defaults(**settings))
    return responder.pool, [str(tmp_path / f"s{n}.lua") for n in range(scripts)]


class Watch:
    """Checks the pool's promises at every loan, from the outside."""

    def __init__(self, pool):
        self.pool = pool
        self.lock = threading.Lock()
        self.lent = set()
        self.worst_total = 0
        self.worst_clones = 0

    def borrow(self, path):
        state = self.pool.acquire(path)
        with self.lock:
            assert id(state) not in self.lent, "one state lent to two requests"
            self.lent.add(id(state))
            states = self.pool.states()
            self.worst_total = max(self.worst_total, len(states))
            self.worst_clones = max(self.worst_clones, sum(s.path == path for s in states))
        return state

    def give_back(self, state):
        with self.lock:
            self.lent.discard(id(state))
        self.pool.release(state)


def hammer(pool, paths, threads, rounds):
    watch = Watch(pool)
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                state = watch.borrow(rng.choice(paths))
                try:
                    result = state.serve(encode_params(
                        {b"SPIN": str(rng.randint(1, 20000)).encode()}), b"", Output())
                    assert result[0], result
                finally:
                    watch.give_back(state)
        except Exception as exc:   # reported below, in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "deadlock: workers still waiting"
    assert not errors, errors
    return watch


def test_limits_hold_and_states_are_never_shared(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=4, workers=6, states=8, clones=3)
    watch = hammer(pool, paths, threads=6, rounds=150)
    assert watch.worst_total <= 8
    assert watch.worst_clones <= 3
    stats = pool.stats()
    assert stats["busy"] == 0 and stats["loading"] == 0


def test_no_deadlock_with_states_equal_to_workers_and_more_scripts(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=12, workers=4, states=4)
    watch = hammer(pool, paths, threads=4, rounds=100)
    assert watch.worst_total <= 4
    assert pool.evicted > 0


def test_a_hot_scripts_only_state_outlives_one_off_scripts(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=4, workers=1, states=2)
    hot, others = paths[0], paths[1:]
    for _ in range(50):
        pool.release(pool.acquire(hot))
    hot_state = pool.states()[0]
    for path in others:   # each one-off needs a slot: the other one-off is evicted, not hot
        pool.release(pool.acquire(path))
    assert hot_state in pool.states()


def test_clones_are_evicted_before_a_scripts_last_state(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=2, workers=2, states=2)
    a1 = pool.acquire(paths[0])
    a2 = pool.acquire(paths[0])   # a1 busy: a clone
    pool.release(a2)
    pool.release(a1)
    pool.release(pool.acquire(paths[1]))
    assert sorted(s.path for s in pool.states()) == sorted(paths)


def test_a_script_that_fails_to_load_frees_its_slot(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=1, workers=1, states=1)
    bad = tmp_path / "bad.lua"
    bad.write_text("this is not lua")
    for _ in range(3):
        with pytest.raises(ScriptError) as info:
            pool.acquire(str(bad))
        assert info.value.kind == "Syntax Error"
    pool.release(pool.acquire(paths[0]))
    assert pool.stats()["states"] == 1


def test_closed_pool_lends_nothing_and_closes_busy_states_on_release(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=1, workers=1, states=1)
    state = pool.acquire(paths[0])
    pool.close()
    with pytest.raises(PoolClosed):
        pool.acquire(paths[0])
    pool.release(state)
    assert pool.states() == []
    # closed on the closer's thread (see closer.py)
    wait_for(lambda: state.runtime is None, what="the state to be closed")


def test_flush_closes_idle_states_and_marks_busy_ones(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=2, workers=2, states=2)
    busy = pool.acquire(paths[0])
    pool.release(pool.acquire(paths[1]))
    assert pool.flush() == 2
    assert [s.path for s in pool.states()] == [paths[0]] and busy.stale
    pool.release(busy)
    assert pool.states() == []
    assert os.path.exists(paths[0])


def test_a_clone_does_not_evict_another_scripts_last_state(tmp_path):
    # no retries: the only wait is the one for the busy state
    pool, paths = make_pool(tmp_path, scripts=2, workers=2, states=2, retries=0)
    pool.release(pool.acquire(paths[1]))
    busy = pool.acquire(paths[0])   # the pool is full: paths[0] busy, paths[1] idle
    waiter = threading.Thread(target=lambda: pool.release(pool.acquire(paths[0])))
    waiter.start()   # wants a clone of paths[0]: must wait, not evict paths[1]
    wait_for(lambda: pool.stats()["waiting"] == 1, what="the second worker to wait")
    assert pool.evicted == 0 and waiter.is_alive()
    pool.release(busy)
    waiter.join(10)
    assert not waiter.is_alive()
    assert sorted(s.path for s in pool.states()) == sorted(paths)
    assert pool.evicted == 0


def test_inspect_lends_only_an_idle_state_and_puts_it_back(tmp_path):
    pool, paths = make_pool(tmp_path, scripts=1, workers=2, states=2)
    first = pool.acquire(paths[0])
    second = pool.acquire(paths[0])   # a clone
    pool.release(first)
    assert pool.inspect(second, lambda s: "looked") is None   # busy: its worker's
    seen = []
    assert pool.inspect(first, lambda s: seen.append(s.busy) or "looked") == "looked"
    assert seen == [True] and not first.busy
    pool.release(second)
    assert pool.acquire(paths[0]) is second   # the look did not make `first` the most recent
    # flushed while lent: closed once the look ends, never handed out
    assert pool.inspect(first, lambda s: pool.flush(lambda t: t is s)) == 1
    assert pool.states() == [second]
    wait_for(lambda: first.runtime is None, what="the state to be closed")
