"""One long-lived thread for every generation of the agent's API (see ``InferenceThread``)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Busy(Exception):
    """More generations wait than the queue holds: the caller answers 429."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} generations waiting")
        self.waiting = waiting


class InferenceThread:
    """Runs every generation on one long-lived thread, started on first use.

    llama.cpp's CPU backend (built with OpenMP) gives each thread that calls into it a team of
    worker threads, kept while that thread lives. The HTTP server answers each connection on a
    thread of its own, so two live connections (or any other thread that once generated) mean
    two teams: more spinning workers than cores, and libgomp then throttles every barrier to a
    futex sleep, which measured ~10x slower decoding on 2 cores. One generating thread keeps a
    single team; the request's thread only waits (the job writes the response itself, so the
    tokens take no extra hop between threads).

    At most `max_waiting` jobs wait behind the running one; `run` raises ``Busy`` beyond that,
    so a burst of requests costs a quick 429 each instead of a thread and a socket held for
    minutes (and a queue no client would wait out)."""

    def __init__(self, max_waiting: int | None = None) -> None:
        self.max_waiting = max_waiting
        self._jobs: list[tuple[Callable[[], None], threading.Event, list[BaseException]]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def run(self, job: Callable[[], None]) -> None:
        done, error = threading.Event(), list[BaseException]()
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
                self._thread.start()
            if self.max_waiting is not None and len(self._jobs) >= self.max_waiting:
                raise Busy(len(self._jobs))
            self._jobs.append((job, done, error))
            self._wake.notify()
        done.wait()
        if error:
            raise error[0]

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._jobs:
                    self._wake.wait()
                job, done, error = self._jobs.pop(0)
            try:
                job()
            except BaseException as exc:  # handed to the waiting request thread
                error.append(exc)
            finally:
                done.set()
