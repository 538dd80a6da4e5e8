"""Which worker of a process takes the next connection: the one on duty, so that while its
requests are short the process runs its Python on one thread.

Every call that releases the interpreter lock (8 a request: epoll_wait, accept4, recv, the
two calls into Lua, send, close, getcwd) handed it to the process's other worker whenever
both were serving: `strace -c -f` on a serving process under plain hello through nginx
counted 15 futex calls a request with 2 workers, 0.08 with 1. So only the worker on duty
takes connections from the acceptor, and it keeps the duty from request to request while
they are short. It passes the duty on (give) before a call into Lua that its script's
requests typically take longer than LONG over (the state pool's hold time: a page whose time
is Lua, or that waits on a database), so that the other workers take connections meanwhile;
and the watcher passes it on for a worker whose request has run longer than STALLED (a page
that is usually short and blocked). A worker that gave the duty takes it back, after its
request, only once the worker on duty gives it.

The rule is soft: a worker may find the duty given away by the watcher just after it looked,
and then two workers wait for connections at once, as every worker did before; the acceptor
serves any number of them.

When the duty is given and no worker waits to take it, every worker of the process is in a
long call, and what the process has parked waits for one of them: `unattended()` is called
then (the acceptor hands those connections to an idle process, request/handoff.py).
"""

import threading

# Seconds a script's requests typically hold a state, past which its worker passes the duty
# on before calling into Lua. Passing it costs a wake-up of the other worker and a wait for
# the duty back: with this at 0.2 ms, the 200-row page (0.35 ms of Lua on this machine) took
# 10-20 us more CPU a request. A page of 1 ms or more pays 1-2% for it; below, 2 x 2 served
# the page at the rate of 2 x 1 anyway (README, Process shape).
LONG = 0.001
STALLED = 0.05   # seconds into a request after which the watcher passes its duty on


class Duty:
    def __init__(self, unattended=None):
        """`unattended()` is called when the duty is given and no worker waits for it."""
        self._cond = threading.Condition(threading.Lock())
        self.holder = None   # the worker.Worker on duty, or None
        self._waiting = 0    # workers waiting in take()
        self._unattended = unattended

    def take(self, worker):
        """Return once `worker` is on duty (at once when it still is)."""
        if self.holder is worker:
            return
        with self._cond:
            self._waiting += 1
            while self.holder is not None and self.holder is not worker:
                self._cond.wait()
            self._waiting -= 1
            self.holder = worker

    def give(self, worker):
        """`worker` is off duty, if it was on it: another waiting worker takes it."""
        if self.holder is not worker:
            return
        with self._cond:
            if self.holder is not worker:
                return
            self.holder = None
            self._cond.notify()
            nobody = not self._waiting
        if nobody and self._unattended is not None:
            self._unattended()
