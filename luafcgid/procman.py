"""Process management (php-fpm's pm): the policy the supervisor consults.

How many serving processes run (static, ondemand, dynamic), which to stop, how long to wait
before restarting processes that keep dying, and, inside a serving process, when it should
ask to be replaced (recycling). The supervisor observes and acts; nothing here forks, signals
or reads the scoreboard.
"""

import collections
import random
import resource
import sys
from typing import NamedTuple, Optional

JITTER = 0.1        # each process's process_max_requests is drawn up to this much higher
MAX_DELAY = 30.0    # the longest a restart waits when processes keep dying


def supervised(config):
    """Whether a supervisor runs the serving processes: unless one process serves as it is
    for the daemon's whole life (one static process, never recycled)."""
    return (config.processes > 1 or config.pm != "static" or config.process_max_requests > 0
            or config.process_max_memory is not None)


def problems(values):
    """What is wrong in the pm settings of checked `values` (config.py), one line each."""
    if values["pm"] != "dynamic":
        return []
    found = []
    low, high, most = (values["min_spare_processes"], values["max_spare_processes"],
                       values["processes"])
    if low > most:
        found.append(f"min_spare_processes: must be at most processes ({most}), got {low}")
    if high < low:
        found.append(f"max_spare_processes: must be at least min_spare_processes ({low}), "
                     f"got {high}")
    start = values["start_processes"]
    if start is not None and start > most:
        found.append(f"start_processes: must be at most processes ({most}), got {start}")
    return found


def initial(config):
    """The processes to start with."""
    if config.pm == "static":
        return config.processes
    if config.pm == "ondemand":
        return 0
    start = config.start_processes
    if start is None:   # php-fpm's default pm.start_servers
        start = config.min_spare_processes + (config.max_spare_processes
                                              - config.min_spare_processes) // 2
    return min(start, config.processes)


def describe(config):
    """The policy in a few words, for the log."""
    workers = f"of {config.workers} workers"
    if config.pm == "static":
        return f"{config.processes} processes {workers}"
    if config.pm == "ondemand":
        return (f"pm ondemand, up to {config.processes} processes {workers}, each stopped "
                f"after {config.process_idle_timeout:g} s idle")
    return (f"pm dynamic, {config.min_spare_processes} to {config.max_spare_processes} idle "
            f"of up to {config.processes} processes {workers}")


def starts_on_demand(config):
    """Whether a request waiting for a process starts one (then the supervisor watches the
    listening socket's queue)."""
    return config.pm != "static"


class Process(NamedTuple):
    """A running process as the policy sees it."""
    pid: int
    idle: Optional[float]   # seconds since it was last seen serving (or started); None while
                            # it starts
    busy: bool = False      # it served during the last second it reported on


def plan(config, processes, waiting):
    """(processes to start, pids of those to stop, the idlest first) for the running
    `processes` (those not already being replaced or stopped), when `waiting` says whether
    a request waits for one. The supervisor stops at most one a second, as php-fpm does."""
    return _PLANS[config.pm](config, processes, waiting)


def _idlest(processes):
    return [p.pid for p in sorted(processes, key=lambda p: -p.idle)]


def _static(config, processes, waiting):
    return max(0, config.processes - len(processes)), []


def _ondemand(config, processes, waiting):
    # one at a time: a process that is starting will take the waiting request
    starting = any(p.idle is None for p in processes)
    start = int(waiting and not starting and len(processes) < config.processes)
    return start, _idlest([p for p in processes if p.idle is not None
                           and p.idle >= config.process_idle_timeout])


def _dynamic(config, processes, waiting):
    spare = [p for p in processes if not p.busy]   # a process starting is spare
    start = max(0, config.min_spare_processes - len(spare))
    if waiting and not any(p.idle is None for p in processes):
        start = max(start, 1)
    start = min(start, config.processes - len(processes))
    excess = len(spare) - config.max_spare_processes
    return start, _idlest([p for p in spare if p.idle is not None])[:max(0, excess)]


_PLANS = {"static": _static, "ondemand": _ondemand, "dynamic": _dynamic}


class RestartThrottle:
    """php-fpm's emergency_restart_threshold and emergency_restart_interval, as a delay:
    once `threshold` processes exited unasked within `interval` seconds, each further exit
    holds restarts 1 s, then twice as long as the last time, up to MAX_DELAY, until
    processes have run for `interval` after a restart without one exiting."""

    def __init__(self):
        self.exits = collections.deque()   # monotonic times of recent unasked exits
        self.delay = 0.0
        self.resumed = 0.0                 # when restarts may resume after the last exit

    def exited(self, now, threshold, interval):
        """A process exited unasked at `now`: the seconds to wait before starting another."""
        if threshold == 0:
            return 0.0
        if self.delay and now - self.resumed >= interval:   # the loop is over
            self.delay = 0.0
            self.exits.clear()
        self.exits.append(now)
        while self.exits[0] < now - interval:
            self.exits.popleft()
        if self.delay:
            self.delay = min(2 * self.delay, MAX_DELAY)
        elif len(self.exits) >= threshold:
            self.delay = 1.0
        self.resumed = now + self.delay
        return self.delay


def resident_memory():
    """This process's resident memory in bytes. Where /proc is missing, its peak, which
    getrusage gives (kilobytes, bytes on macOS)."""
    try:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * resource.getpagesize()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Recycling:
    """In a serving process: when to ask the supervisor for a successor."""

    def __init__(self, max_requests, max_memory):
        # `random` is reseeded in every forked child, so each process draws its own
        self.max_requests = (max_requests + random.randint(0, int(max_requests * JITTER))
                             if max_requests else 0)
        self.max_memory = max_memory

    def due(self, requests):
        """Why this process, having answered `requests`, should be replaced now (for the
        log), or None."""
        if self.max_requests and requests >= self.max_requests:
            return (f"answered {requests} requests (its process_max_requests, with jitter: "
                    f"{self.max_requests})")
        if self.max_memory is not None:
            rss = resident_memory()
            if rss > self.max_memory:
                return (f"uses {rss / 2**20:.0f} MiB (process_max_memory: "
                        f"{self.max_memory / 2**20:.0f} MiB)")
        return None
