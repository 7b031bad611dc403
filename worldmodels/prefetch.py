"""Reading ahead: an iterable consumed in a background thread while the caller works.

Reading and decompressing episode files then overlaps with a training step or with
encoding (zlib and NumPy release the GIL).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(iterable: Iterable, depth: int = 2) -> Iterator:
    """Iterate `iterable` in a background thread, keeping up to `depth` items ready.

    Errors in the thread are raised in the consumer; stopping early (``break``) stops
    the thread after its current item.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=work, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
