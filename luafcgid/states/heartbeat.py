"""The heartbeat: flush states whose script (or prelude) changed on disk.

A thread compares every loaded script's signature (nanosecond mtime, size, inode and ctime)
every `sweep` milliseconds; a watchdog observer on the scripts' directories flushes at once
when the file system reports a change. The sweep catches what the observer cannot see
(network file systems, a missed event); the observer makes an edit show on the next request.
"""

import logging
import os
import threading

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("luafcgid")


class _ScriptEvents(FileSystemEventHandler):
    def __init__(self, heartbeat):
        self.heartbeat = heartbeat

    def on_any_event(self, event):
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.heartbeat.flush_changed(os.fsdecode(path))


class Heartbeat:
    """The heartbeat thread and the file watcher, for one responder's states: watch(path)
    is the responder's on_load, start(pool, forget_locations) begins."""

    def __init__(self, sweep_ms):
        self.pool = None
        self._forget_locations = None
        self.interval = sweep_ms / 1000.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._observer = Observer()
        self._observer.daemon = True
        self._handler = _ScriptEvents(self)
        self._watches = {}   # directory -> watchdog watch
        self._watches_lock = threading.Lock()

    def start(self, pool, forget_locations):
        """Watch the scripts of `pool`'s states; forget_locations() empties the responder's
        cache of where scripts are, at every sweep."""
        self.pool = pool
        self._forget_locations = forget_locations
        self._observer.start()
        self._thread.start()

    def alive(self):
        """Whether the heartbeat thread still runs (systemd's watchdog asks)."""
        return self._thread.is_alive()

    def stop(self):
        self._stop.set()
        self._observer.stop()
        self._thread.join()

    def flush_changed(self, path=None):
        """Flush the states (of `path`, or of every script) whose file changed."""
        # stat() outside the pool's lock; the lock is only taken to flush
        # (the snapshot keeps its states alive, so their ids stay unique meanwhile)
        snapshot = self.pool.states()
        changed = {id(s) for s in snapshot
                   if (path is None or path in (s.path, s.prelude)) and s.changed_on_disk()}
        if not changed:
            return 0
        flushed = self.pool.flush(lambda s: id(s) in changed)
        if flushed:
            log.info("reloading %s: %d state(s) flushed", path or "changed scripts", flushed)
        return flushed

    def sweep(self):
        self._forget_locations()
        self.flush_changed()
        directories = {os.path.dirname(s.path) for s in self.pool.states()}
        with self._watches_lock:
            for gone in set(self._watches) - directories:
                watch = self._watches.pop(gone)
                if watch is not None:
                    self._observer.unschedule(watch)

    def watch(self, script):
        """Watch the directory of a script that was just loaded (at once, not at the next
        sweep)."""
        directory = os.path.dirname(script)
        with self._watches_lock:
            if directory in self._watches:
                return
            try:
                self._watches[directory] = self._observer.schedule(self._handler, directory)
            except OSError as exc:   # e.g. inotify watches exhausted: the sweep still works
                log.warning("cannot watch %s for changes: %s", directory, exc)
                self._watches[directory] = None

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:
                log.exception("the heartbeat failed")
