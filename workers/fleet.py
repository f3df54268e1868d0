"""This worker's place in the fleet: its daemon's image index, kept fresh in Redis.

The API routes a publish to the daemon that holds its source and lists the fleet's images from
an index each daemon's workers keep (``service/fleet.py``), so it never has to ask a daemon
itself. A thread in the worker's main process follows the daemon's image events (tag, untag,
pull, push, delete, load, import, build) and rewrites the index after each burst of them, when
an API process asks for a fresh look (a name it did not find), and at least every
``INDEX_MAX_AGE`` seconds — so an image a pipeline built on the daemon a moment ago is found.
"""

from __future__ import annotations

import logging
import threading
import time

from service.fleet import INDEX_MAX_AGE, Fleet

from .docker_engine import DockerEngine

log = logging.getLogger(__name__)

# After an event, wait this long for the rest of its burst (a build tags, a pull writes layers)
# before listing the images once.
DEBOUNCE_SECONDS = 0.1


class DaemonIndex:
    def __init__(self, fleet: Fleet, engine: DockerEngine, daemon: str):
        self.fleet, self.engine, self.daemon = fleet, engine, daemon
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._indexed_at = 0.0

    def start(self) -> None:
        self._dirty.set()  # a first index at once
        threading.Thread(target=self._follow_events, name="imagepub-daemon-events", daemon=True).start()
        threading.Thread(target=self._keep_fresh, name="imagepub-daemon-index", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _follow_events(self) -> None:
        while not self._stop.is_set():
            try:
                for _event in self.engine.image_events():
                    self._dirty.set()
                    if self._stop.is_set():
                        return
            except Exception as exc:  # the daemon went away (or restarts): index again once it is back
                log.warning("daemon %s: image events interrupted (%s)", self.daemon, exc.__class__.__name__)
            self._dirty.set()
            self._stop.wait(1.0)

    def _keep_fresh(self) -> None:
        while not self._stop.wait(0.05):
            stale = time.time() - self._indexed_at > INDEX_MAX_AGE
            try:
                wanted = self.fleet.refresh_wanted() > self._indexed_at
            except Exception:  # Redis away: the supervisor reports it; try again next tick
                continue
            if not (self._dirty.is_set() or wanted or stale):
                continue
            if self._dirty.is_set():
                time.sleep(DEBOUNCE_SECONDS)
            self._dirty.clear()
            started = time.time()
            try:
                self.fleet.write_index(self.daemon, self.engine.list_images(), listed_at=started)
                self._indexed_at = started
            except Exception as exc:
                log.warning("daemon %s: could not index its images (%s)", self.daemon, exc.__class__.__name__)
                self._stop.wait(1.0)
