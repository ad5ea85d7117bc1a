"""The one thread a worker's views share beside the request thread.

ClaDec's reference images start on it while the classifier runs and its decoders are queued
once the activations exist. When the request thread reaches the concept view's intervention
graphs, the helper joins it as soon as it is free, ahead of the decoders (whose images are only
needed at the end of the answer), and takes the next graph whenever it finishes one
(:func:`run_shared`). One shared helper rather than a thread per view: on two cores a third
busy thread only takes turns with the other two (the lever "the helper thread" in
docs/benchmarks.md).
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[Future, Callable[..., Any], tuple[Any, ...]]  # (its future, function, arguments)


class HelperThread:
    """A single worker thread, started on the first :meth:`submit`. Urgent jobs run before
    the others still waiting, each kind in the order submitted. After :meth:`close` (or while
    the interpreter shuts down) :meth:`submit` returns None and callers run the work
    themselves. A helper that is dropped without :meth:`close` stops its thread when
    collected."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._release: weakref.finalize | None = None
        self._closed = False
        self._lock = threading.Lock()
        # waiting jobs (urgent, others); the pool gets one dispatch call per job, and each
        # call runs whichever job comes first at that moment
        self._waiting: tuple[deque[_Job], deque[_Job]] = (deque(), deque())

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> Future[T] | None:
        """Queue ``fn(*args)`` on the thread (``urgent``: ahead of the waiting jobs that are
        not); None when the helper is closed or refuses work."""
        future: Future[T] = Future()
        with self._lock:  # batches may begin on several threads (the KServe front door)
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
                self._release = weakref.finalize(self, self._pool.shutdown, wait=False)
            queue = self._waiting[0 if urgent else 1]
            queue.append((future, fn, args))
            try:
                self._pool.submit(self._dispatch)
            except RuntimeError:  # the pool or the interpreter is shutting down
                queue.pop()
                return None
        return future

    def _dispatch(self) -> None:
        with self._lock:
            future, fn, args = (self._waiting[0] or self._waiting[1]).popleft()
        if future.set_running_or_notify_cancel():  # False: cancelled while waiting
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def close(self) -> None:
        """Stop the thread after the job it runs and those waiting. Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            release, self._release = self._release, None
        if release is not None:
            release.detach()
        if pool is not None:
            pool.shutdown(wait=True)


def run_shared(tasks: Sequence[Callable[[], None]], helper: HelperThread | None) -> None:
    """Run every task once, on this thread and on ``helper`` together, and return when all are
    done. Both take the next task from the front of ``tasks`` (give them costliest first);
    the helper joins as an urgent job when it is free (after the job it runs, before the
    ones waiting), so a helper still busy takes nothing and this thread runs them all. A
    task's error stops the others from starting and is raised here, once the task the helper
    runs (if any) has finished; this thread's own error wins over the helper's."""
    queue = deque(tasks)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                if not queue:
                    return
                task = queue.popleft()
            try:
                task()
            except BaseException:
                with lock:  # nobody starts another task
                    queue.clear()
                raise

    joined = helper.submit(drain, urgent=True) if helper is not None and len(tasks) > 1 else None
    try:
        drain()
    except BaseException:
        if joined is not None and not joined.cancel():
            wait([joined])  # the helper's task ends before the error leaves; this error wins
        raise
    if joined is not None and not joined.cancel():
        joined.result()
