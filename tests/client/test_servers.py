"""Spreading jobs over several servers (client/servers.py), without a server: fakes that die."""

import threading
import time
import urllib.error

import pytest

from diffusion_blend.client.api import ComfyError
from diffusion_blend.client.servers import AllServersDown, server_down, spread


class FakeServer:
    def __init__(self, name: str, dies_at: int | None = None, delay: float = 0.01):
        self.name, self.dies_at, self.delay, self.done = name, dies_at, delay, []

    def run(self, job: int) -> str:
        time.sleep(self.delay)
        if self.dies_at is not None and len(self.done) >= self.dies_at:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        self.done.append(job)
        return f"result {job}"


def test_jobs_come_back_in_order_and_a_dead_servers_job_is_redone_elsewhere():
    a, b = FakeServer("a"), FakeServer("b", dies_at=2)
    log = []
    out = spread([a, b], list(range(12)), lambda s, j: s.run(j), name=lambda s: s.name, log=log.append)
    assert out == [f"result {j}" for j in range(12)]
    assert len(b.done) == 2 and sorted(a.done + b.done) == list(range(12))  # nothing lost, nothing twice
    assert len(log) == 1 and "b is down (URLError" in log[0]


def test_every_server_down_names_them_and_a_prompt_error_is_raised_as_is():
    with pytest.raises(AllServersDown, match="every server went down: ") as info:
        spread([FakeServer("a", dies_at=1), FakeServer("b", dies_at=0)], list(range(5)), lambda s, j: s.run(j),
               name=lambda s: s.name, log=lambda _: None)
    assert "a (URLError" in str(info.value) and "b (URLError" in str(info.value)

    def bad(server, job):
        if job == 3:
            raise ComfyError("prompt rejected: node 2 (DiffusionBlend): mode='x'")
        return job

    with pytest.raises(ComfyError, match="mode='x'"):
        spread([FakeServer("a"), FakeServer("b")], list(range(6)), bad, log=lambda _: None)


def test_idle_servers_wait_for_a_job_that_may_come_back():
    """The last job runs on a server that then dies: the other, idle by then, must take it."""
    started = threading.Event()

    def run(server, job):
        if server.name == "slow":
            started.set()
            time.sleep(0.2)
            raise ConnectionResetError("reset by peer")
        started.wait()
        return job

    out = spread([FakeServer("slow"), FakeServer("fast")], [0, 1], run, name=lambda s: s.name, log=lambda _: None)
    assert out == [0, 1]


def test_what_counts_as_a_server_down():
    assert server_down(urllib.error.URLError("refused")) and server_down(ConnectionResetError())
    assert server_down(TimeoutError("no answer"))
    assert not server_down(ComfyError("node failed")) and not server_down(ValueError("bad"))
