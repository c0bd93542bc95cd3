"""One producer thread with a bounded queue, for every backend that prepares batches ahead.

``Prefetcher(items, depth)`` runs ``next(items)`` in a daemon thread and keeps at most ``depth`` results
waiting.  The consumer iterates it (or calls :meth:`get`); an exception raised by the producer is
raised in the consumer, in order, after the items produced before it; :meth:`close` stops the
producer at its next item, discards what was prepared and joins the thread (idempotent; also on
``with`` exit or when the consumer stops iterating early).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class _End:
    """End-of-items marker."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Produce ``items`` in a background thread, ``depth`` ahead of the consumer."""

    def __init__(self, items: Iterable[T], depth: int = 2, name: str = "pipelines-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=int(depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(iter(items),), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[T]) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = next(items)
                except StopIteration:
                    self._put(_End())
                    return
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator: run its finally blocks in this thread
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing must not mask the outcome
                    pass

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> T:
        """The next item; StopIteration after the last; the producer's exception when it raised."""
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self.get()
                except StopIteration:
                    return
                yield item
        finally:
            self.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop producing, discard what was produced and join the thread."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
