"""Worker processes that end with their parent. A process pool's workers outlive a parent that is killed (SIGKILL
gives it no chance to stop them): each would go on training, holding its run folder's lock and its memory, for
nobody. A worker started with `exit_with_parent` ends within a second of its parent instead; the run it was
training resumes from its last checkpoint, as after any kill."""
from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_with_parent"]


def _watch(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)  # the parent is gone: nothing is waiting for this process's result


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """End this process as soon as its parent, whose process id is `parent`, has ended (a process pool's
    initializer). A daemon thread compares the parent process id with `parent` every `interval` seconds: when the
    parent ends, the process is handed to another parent."""
    threading.Thread(target=_watch, args=(parent, interval), name="exit-with-parent", daemon=True).start()
