"""The nodes' LRU cache is bounded in entries and in bytes."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _nodes_importable(comfy_inprocess):
    global LruCache, memory_budget
    from diffusion_blend.nodes.cache import LruCache, memory_budget  # the nodes package imports comfy


def test_bytes_bound_evicts_least_recently_used_and_keeps_the_newest():
    made = []
    cache = LruCache(10, max_bytes=100, sizeof=len)

    def make(key, n):
        return lambda: made.append(key) or "x" * n

    cache.get("a", make("a", 40))
    cache.get("b", make("b", 40))
    cache.get("a", make("a", 40))  # a hit: "a" is now the most recent
    cache.get("c", make("c", 40))  # 120 bytes: "b" (least recent) goes
    assert made == ["a", "b", "c"] and cache.bytes == 80 and len(cache) == 2
    cache.get("b", make("b", 40))
    assert made[-1] == "b" and cache.bytes == 80  # "a" went this time
    cache.get("huge", make("huge", 500))  # larger than the budget alone: kept, everything else dropped
    assert len(cache) == 1 and cache.bytes == 500
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_entry_bound_still_holds_without_sizes():
    cache = LruCache(2)
    for k in range(5):
        cache.get(k, lambda k=k: k)
    assert len(cache) == 2 and cache.get(4, lambda: None) == 4


def test_budget_from_the_environment_or_a_fraction_of_ram(monkeypatch):
    monkeypatch.setenv("DB_TEST_CACHE_MB", "64")
    assert memory_budget("DB_TEST_CACHE_MB", 0.1, 2**40) == 64 * 2**20
    monkeypatch.setenv("DB_TEST_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="DB_TEST_CACHE_MB='lots': expected a number of megabytes"):
        memory_budget("DB_TEST_CACHE_MB", 0.1, 2**40)
    monkeypatch.delenv("DB_TEST_CACHE_MB")
    assert 0 < memory_budget("DB_TEST_CACHE_MB", 0.1, 2**40) <= 2**40
    assert memory_budget("DB_TEST_CACHE_MB", 0.1, 1000) == 1000
