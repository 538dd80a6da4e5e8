"""request/handoff.py: a process that accepts a batch of connections (the web server keeps
connections) hands the others their share, so that kept connections are not all served by
the process that woke; and one whose workers are all in long requests hands what it has
parked to an idle one."""

import itertools
import os
import signal

from conftest import Fifo, InThread, RawClient, split_response, wait_for

from luafcgid.request.handoff import Handoff, Share

# answers its process's pid; with a query string NAME it first marks itself in flight (a
# file "in-NAME") and waits at its FIFO "gate-NAME". Held requests go to a copy, hold.lua: a
# held request makes its script's requests typically long, and a process whose last free
# worker starts a long one hands what it has parked to an idle process (tested below)
PID_PAGE = """
local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
function main(env, con)
  local name = env.QUERY_STRING
  if name ~= "" then
    io.open("in-" .. name, "w"):close()
    local gate = io.open("gate-" .. name); gate:read("*a"); gate:close()
  end
  con:puts(pid)
end
"""
BURST = 8


class Kept:
    """A connection the client keeps (FCGI_KEEP_CONN), asking the pid page."""

    def __init__(self, address, site):
        self.client = RawClient(address, timeout=60)
        self.site = site

    def ask(self, name=""):
        script = self.site.file("hold.lua" if name else "pid.lua")
        self.client.request({b"SCRIPT_FILENAME": script.encode(),
                             b"QUERY_STRING": name.encode()}, keep_conn=True)

    def answer(self):
        """The pid that answered."""
        out, _, _ = self.client.response()
        status, _, body = split_response(out)
        assert status == "200 OK", out
        return int(body)

    def hold(self, name):
        """Ask with the page held at its gate: that process's only worker is busy until
        the Fifo returned is released."""
        gate = Fifo(self.site.file(f"gate-{name}"))
        self.ask(name)
        wait_for(lambda: os.path.exists(self.site.file(f"in-{name}")),
                 what=f"request {name} in the page")
        return gate


def _burst_while_both_held(daemon, site):
    """Two processes of one worker, each held in a page on a kept connection (x, y); then
    BURST connections opened at once, which wait in the listener's backlog; then x's
    process let go: its worker accepts the burst as one batch. Returns (the daemon, x, y,
    y's gate, the burst, x's pid)."""
    site.write("pid.lua", PID_PAGE)
    site.write("hold.lua", PID_PAGE)
    d = daemon(processes=2, workers=1)
    x = Kept(d.address, site)
    x_gate = x.hold("x")
    y = Kept(d.address, site)   # accepted by the other process: the first's worker is busy
    y_gate = y.hold("y")
    burst = [Kept(d.address, site) for _ in range(BURST)]
    wait_for(x_gate.release, what="x's page to read its gate")
    return d, x, y, y_gate, burst, x.answer()


def test_a_burst_of_kept_connections_is_served_by_both_processes(daemon, site):
    _, x, y, y_gate, burst, x_pid = _burst_while_both_held(daemon, site)
    x_gate = x.hold("x2")   # now x's process is busy, with the burst accepted
    try:
        wait_for(y_gate.release, what="y's page to read its gate")
        y_pid = y.answer()
        assert y_pid != x_pid
        for connection in burst:
            connection.ask()
        answers = [InThread(connection.answer) for connection in burst]
        # while x's process is held, the other answers the connections it was handed:
        # before, the process that woke kept the whole batch, and these waited for it
        wait_for(lambda: sum(answer.done() for answer in answers) >= BURST // 2 - 1,
                 what="the other process to answer its share of the burst")
        assert {answer.result() for answer in answers if answer.done()} == {y_pid}
    finally:
        wait_for(x_gate.release, what="x2's page to read its gate")
    assert x.answer() == x_pid
    assert {answer.result() for answer in answers} == {x_pid, y_pid}


def _burst_asked_while_y_is_held(daemon, site):
    """_burst_while_both_held, then every connection of the burst asks: x's process answers
    its share, the rest were sent to y's, busy. Returns (the daemon, y, y's gate, the
    answers (InThread), x's pid, y's pid)."""
    d, x, y, y_gate, burst, x_pid = _burst_while_both_held(daemon, site)
    for connection in burst:
        connection.ask()
    answers = [InThread(connection.answer) for connection in burst]
    wait_for(lambda: sum(answer.done() for answer in answers) >= BURST // 2 - 1,
             what="x's process to answer its share of the burst")
    parent = d.proc.pid
    with open(f"/proc/{parent}/task/{parent}/children") as stream:
        y_pid, = {int(pid) for pid in stream.read().split()} - {x_pid}
    return d, y, y_gate, answers, x_pid, y_pid


def test_a_process_told_to_stop_serves_the_connections_handed_to_it(daemon, site):
    _, y, y_gate, answers, x_pid, y_pid = _burst_asked_while_y_is_held(daemon, site)
    os.kill(y_pid, signal.SIGTERM)   # it drains: every connection handed to it is served
    wait_for(y_gate.release, what="y's page to read its gate")
    assert y.answer() == y_pid
    pids = [answer.result() for answer in answers]
    assert set(pids) == {x_pid, y_pid} and pids.count(y_pid) >= BURST // 2 - 1


def test_connections_handed_to_a_process_that_dies_go_to_another(daemon, site):
    """The burst's share sent to y's process waits unread in its slot when that process is
    killed: the supervisor hands it to x's process, instead of leaving it for the process
    that replaces y's (which took at least a start, and longer when processes keep
    dying)."""
    d, _, _, answers, x_pid, y_pid = _burst_asked_while_y_is_held(daemon, site)
    os.kill(y_pid, signal.SIGKILL)
    assert {answer.result() for answer in answers} == {x_pid}
    assert f"(pid {y_pid}), which ended unread, went to process" in d.log()


def test_a_connection_parked_in_a_process_whose_workers_are_busy_goes_to_an_idle_one(
        daemon, site):
    """Two processes of one worker. Of three kept connections two are parked in one process,
    which then takes a long request on one of them: the other, idle, is handed to the idle
    process, which answers its next request at once. Before, that request waited for the
    long one to end."""
    site.write("pid.lua", PID_PAGE)
    site.write("hold.lua", PID_PAGE)
    d = daemon(processes=2, workers=1)
    kept = [Kept(d.address, site) for _ in range(3)]
    pids = []
    for connection in kept:
        connection.ask()
        pids.append(connection.answer())
    x, z = next((a, b) for a, b in itertools.combinations(kept, 2)
                if pids[kept.index(a)] == pids[kept.index(b)])
    busy = pids[kept.index(x)]
    gate = x.hold("x")
    try:
        z.ask()
        answer = InThread(z.answer)
        wait_for(answer.done, what="the idle process to answer")
        assert answer.result() != busy
    finally:
        wait_for(gate.release, what="x's page to read its gate")
    assert x.answer() == busy


class _Connection:
    """What Share.spread reads of an acceptor's Connection."""

    def __init__(self, fd):
        self.fd = fd
        self.kept = False


def test_a_closed_share_is_sent_nothing_more_and_receives_what_was_sent_before(tmp_path):
    """The drain's order, within one process: the batch goes to the process holding fewer
    connections; once that one closed its share it receives what was sent before, and
    nothing more is sent to it."""
    handoff = Handoff(2)
    one, two = Share(handoff, 1), Share(handoff, 2)
    one.open()
    two.open()
    files = [open(tmp_path / f"file{n}", "w") for n in range(3)]
    try:
        batch = [_Connection(f.fileno()) for f in files]
        batch[1].kept = True   # the web server keeps it: so does the process it goes to
        assert one.spread(batch, mine=5) == ([], batch)
        received = two.close()
        assert ([(os.fstat(fd).st_ino, kept) for fd, kept in received]
                == [(os.fstat(f.fileno()).st_ino, n == 1) for n, f in enumerate(files)])
        for fd, _ in received:
            os.close(fd)
        assert one.spread(batch, mine=5) == (batch, [])
        assert handoff.send(2, [(files[0].fileno(), False)]) == 0
    finally:
        for f in files:
            f.close()
        handoff.close()


def test_a_batch_is_split_so_that_the_processes_hold_as_many(tmp_path):
    handoff = Handoff(3)   # slot 3 takes no connections: no process runs in it
    one, two = Share(handoff, 1), Share(handoff, 2)
    one.open()
    two.open()
    two.held(1)
    files = [open(tmp_path / f"file{n}", "w") for n in range(5)]
    try:
        batch = [_Connection(f.fileno()) for f in files]
        # this process holds 2: the other gets the first (1 < 2), this one the next (2 = 2)
        kept, handed = one.spread(batch, mine=2)
        assert (kept, handed) == (batch[1:4:2], batch[0:5:2])
        assert handoff.load(2) == 1 + 3
        for fd, _ in two.receive():
            os.close(fd)
        assert handoff.load(2) == 1
    finally:
        for f in files:
            f.close()
        handoff.close()
