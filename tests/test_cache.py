"""pipeline/llm/cache.py: the persistent LLM call cache."""

from __future__ import annotations

from pipeline.llm.cache import LLMCache, cache_key


def test_key_is_stable_and_sensitive_to_every_part():
    base = dict(model="m@1", prompt="p", schema="{}", decoding={"temperature": 0.0, "seed": 1})
    assert cache_key(**base) == cache_key(**dict(reversed(list(base.items()))))
    for part, other in [("model", "m@2"), ("prompt", "p "), ("schema", "{ }"), ("decoding", {"temperature": 0.5, "seed": 1})]:
        assert cache_key(**{**base, part: other}) != cache_key(**base), part


def test_values_persist_across_reopen_with_their_timestamp(tmp_path):
    path = tmp_path / "llm.duckdb"
    with LLMCache(path) as cache:
        stored = cache.put_many("generate", {"k1": {"task": "t", "query": "q"}, "k2": [1, 2]})
    with LLMCache(path) as cache:
        found = cache.get_many(["k1", "k2", "missing"])
        assert found["k1"].value == {"task": "t", "query": "q"} and found["k2"].value == [1, 2]
        assert found["k1"].created_at == stored["k1"].created_at
        assert "missing" not in found and (cache.hits, cache.misses) == (2, 1)
        assert cache.count("generate") == 2 and cache.count("score") == 0


def test_a_rewrite_replaces_the_value(tmp_path):
    with LLMCache(tmp_path / "c.duckdb") as cache:
        cache.put_many("generate", {"k": "first"})
        again = cache.put_many("generate", {"k": "second"})
        assert cache.get_many(["k"])["k"] == again["k"] and again["k"].value == "second"
        assert cache.count() == 1


def test_disabled_cache_stores_nothing():
    cache = LLMCache(None)
    assert not cache.enabled
    assert cache.put_many("generate", {"k": 1})["k"].value == 1
    assert cache.get_many(["k"]) == {} and cache.misses == 1
