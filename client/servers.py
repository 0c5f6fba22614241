"""Several ComfyUI servers as one: jobs spread over them, one at a time per server, and a job whose
server dies is run again on another.

ComfyUI scales out by running one server per GPU or per machine; a sweep's cells (or a batch of
workflows) are independent, so each server takes the next job as soon as it is free.  A server that
cannot be reached, drops the connection or does not answer in time is *down*: its job goes back to
the queue and the server takes no more.  An error the server reports about the prompt itself
(:class:`ComfyError`: a node failed, the prompt was rejected) is the job's, and is raised: another
server would say the same.
"""

from __future__ import annotations

import http.client
import threading
from collections import deque
from typing import Callable, Sequence, TypeVar

from .api import ComfyError

__all__ = ["server_down", "spread", "AllServersDown"]

Server = TypeVar("Server")
Job = TypeVar("Job")
Result = TypeVar("Result")


class AllServersDown(ConnectionError):
    """Every server went down before the jobs were done."""


def server_down(exc: BaseException) -> bool:
    """Whether ``exc`` says the server is gone (refused, reset, closed, timed out), not the prompt bad."""
    if isinstance(exc, ComfyError):
        return False
    if isinstance(exc, (OSError, http.client.HTTPException, TimeoutError)):  # URLError, ConnectionError, ...
        return True
    try:
        import websocket  # websocket-client, for progress events
    except ImportError:
        return False
    return isinstance(exc, websocket.WebSocketException)


def spread(servers: Sequence[Server], jobs: Sequence[Job], run: Callable[[Server, Job], Result],
           name: Callable[[Server], str] = str, log: Callable[[str], None] = print) -> list[Result]:
    """``[run(server, job) for job in jobs]``, in the jobs' order, each job on whichever server is free.

    One thread per server.  A job whose server goes down (:func:`server_down`) is queued again for
    the others; when every server is down, :class:`AllServersDown` names them.  Any other error stops
    the work (jobs already running finish) and is raised."""
    if not servers:
        raise ValueError("servers: expected at least one")
    pending: deque[int] = deque(range(len(jobs)))
    results: dict[int, Result] = {}
    running = 0
    alive = len(servers)
    failure: list[BaseException] = []
    down: list[str] = []
    cond = threading.Condition()

    def next_job() -> int | None:
        nonlocal running
        with cond:
            while not pending and running and not failure:
                cond.wait()  # a running job may yet come back
            if failure or not pending:
                return None
            running += 1
            return pending.popleft()

    def worker(server: Server) -> None:
        nonlocal running, alive
        while (index := next_job()) is not None:
            try:
                result = run(server, jobs[index])
            except BaseException as exc:  # noqa: BLE001  (sorted out below, re-raised in the caller)
                with cond:
                    running -= 1
                    if server_down(exc):
                        pending.appendleft(index)
                        alive -= 1
                        down.append(f"{name(server)} ({type(exc).__name__}: {exc})")
                        log(f"[servers] {name(server)} is down ({type(exc).__name__}: {exc}); its job "
                            f"{index + 1} goes to another server")
                        if alive == 0:
                            failure.append(AllServersDown("every server went down: " + "; ".join(down)))
                    else:
                        failure.append(exc)
                    cond.notify_all()
                return
            with cond:
                running -= 1
                results[index] = result
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failure:
        raise failure[0]
    return [results[i] for i in range(len(jobs))]
