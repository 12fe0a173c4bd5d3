import pytest

from camelot import CamelotConfig


@pytest.mark.parametrize("field,value,needle", [
    ("window", 0, "window"), ("window", 1.5, "window"), ("slots", 0, "slots"), ("slots", -3, "slots"),
    ("threshold", 1.5, "threshold"), ("threshold", -1.01, "threshold"), ("threshold", "high", "threshold"),
    ("read_top_k", 0, "read_top_k"), ("strategy", "magic", "strategy"), ("search", "annoy", "search"),
    ("layers", [], "layers"), ("layers", [-1], "layers"), ("write_mode", "batch", "write_mode"),
    ("memory_distance", -1, "memory_distance"), ("retrieve", "nearest", "retrieve"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        CamelotConfig(**{field: value})


def test_top_k_cannot_exceed_slots():
    with pytest.raises(ValueError, match="top_k"):
        CamelotConfig(slots=4, read_top_k=8)


def test_defaults_and_replace():
    cfg = CamelotConfig()
    assert cfg.distance == cfg.window + cfg.recent  # memory sits right before the raw tail
    assert cfg.paper().distance == cfg.window and cfg.paper().read_top_k == 1
    assert cfg.paper().retrieve == "key"  # the paper reads the slot nearest the key
    assert CamelotConfig(slots=512).retrieve == "query"
    other = cfg.replace(window=64, layers=[3, 1, 1])
    assert other.window == 64 and other.layers == [1, 3] and cfg.window == 128
    assert CamelotConfig(memory_distance=0).distance == 0


def test_renamed_read_top_k_accepts_the_old_spelling_with_a_warning():
    with pytest.warns(FutureWarning, match="read_top_k"):
        old = CamelotConfig(top_k=8)
    assert old == CamelotConfig(read_top_k=8)
    with pytest.warns(FutureWarning):
        assert old.top_k == 8
    with pytest.raises(ValueError, match="not both"), pytest.warns(FutureWarning):
        CamelotConfig(top_k=8, read_top_k=4)
    with pytest.raises(TypeError, match="unknown option"):
        CamelotConfig(slotz=3)


def test_every_option_has_help_and_its_flag_is_built_from_the_field():
    import argparse
    from dataclasses import fields

    from camelot.options import add_config_args, config_from_args

    p = argparse.ArgumentParser()
    add_config_args(p)
    names = {f.name for f in fields(CamelotConfig)}
    assert all(CamelotConfig.help(n) for n in names)
    args = p.parse_args(["--slots", "64", "--read-top-k", "all", "--retrieve", "group", "--count-bias", "off",
                         "--layers", "0-2,5"])
    cfg = config_from_args(args)
    assert (cfg.slots, cfg.read_top_k, cfg.retrieve, cfg.count_bias, cfg.layers) == (64, None, "group", 0.0,
                                                                                        [0, 1, 2, 5])
    with pytest.raises(SystemExit):
        p.parse_args(["--retrieve", "nearest"])  # not one of the field's Literal values
    with pytest.warns(FutureWarning, match="--read-top-k"):
        assert config_from_args(p.parse_args(["--top-k", "3"])).read_top_k == 3


def test_auto_read_is_exact_for_small_banks_and_the_grouped_fast_read_for_large_ones():
    from camelot.config import AUTO_EVERY_SLOT_MAX

    small = CamelotConfig(slots=AUTO_EVERY_SLOT_MAX)
    assert (small.read_top_k, small.retrieve) == (None, "query")
    big = CamelotConfig(slots=AUTO_EVERY_SLOT_MAX + 1)
    assert (big.read_top_k, big.retrieve, big.search) == (8, "group", "torch-bf16")
    assert CamelotConfig().read_top_k is None  # the default bank (2048 slots) is read whole: the fast read
    assert CamelotConfig(slots=4096).read_top_k is None  # lost Qwen most of its memory (config.py)
    # what the user gives stays: an exact search, another rule, or every slot
    assert CamelotConfig(slots=2048, search="torch").search == "torch"
    assert CamelotConfig(slots=2048, retrieve="query").retrieve == "query"
    assert CamelotConfig(slots=2048, read_top_k=None).read_top_k is None
    assert CamelotConfig(slots=256, search="faiss").read_top_k == 8  # a top-k backend gets a top-k
    assert CamelotConfig(strategy="knn").read_top_k is None and CamelotConfig(strategy="sliding").read_top_k is None
    assert CamelotConfig(slots=10000).replace(slots=512).read_top_k == 8  # resolved once, then concrete


@pytest.mark.parametrize("native", [True, False])
def test_auto_search_scores_in_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native):
    import camelot.config as config

    monkeypatch.setattr(config, "fast_bfloat16", lambda: native)
    cfg = CamelotConfig()
    assert (cfg.search, cfg.read_top_k) == ("torch-bf16" if native else "torch", None)  # every slot either way
    assert CamelotConfig(search="auto", slots=AUTO_SLOTS_BIG).retrieve == "group"
    assert CamelotConfig(search="torch").search == "torch"  # what the user gives stays
    assert CamelotConfig(search="auto").replace(slots=64).search == cfg.search  # resolved once


AUTO_SLOTS_BIG = 10000


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, True, True), (False, True, False), (False, False, False)])
def test_bfloat16_counts_as_fast_only_with_amx(monkeypatch, amx, avx512_bf16, fast):
    """AVX512-BF16 alone (AMD EPYC) measured the fused bfloat16 read no faster than fp32 (docs/speed.md)."""
    import torch

    import camelot.config as config

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert config.fast_bfloat16() is fast


def test_count_mode_choices_are_the_ones_the_bias_implements():
    from typing import get_args

    from camelot.config import CountMode
    from camelot.reads.base import COUNT_MODES

    assert get_args(CountMode) == COUNT_MODES
    assert CamelotConfig(count_mode="absolute").count_mode == "absolute"
    with pytest.raises(ValueError, match="count_mode must be one of relative, absolute"):
        CamelotConfig(count_mode="log")
    assert CamelotConfig(count_cap=32).count_cap == 32.0
    for bad in (0.5, True, "32", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="count_cap must be None or a number >= 1"):
            CamelotConfig(count_cap=bad)


def test_the_default_write_is_the_balanced_preset_with_half_the_budget_raw():
    """Since 2026-12-06 the default is recall("balanced"): a third of the slots a reserve, the rest
    evicted by use, and half of what the last query attends raw and recent: window + tail = sinks
    + slots (since 2026-12-07; 2048 entries per head at window 128); recent and span_reserve
    "auto" follow slots and window through replace(), and what is given wins."""
    cfg = CamelotConfig()
    assert (cfg.window, cfg.slots, cfg.recent, cfg.sink, cfg.span_reserve) == (128, 1084, 960, 4, 361)
    assert cfg.slots + cfg.recent + cfg.sink == 2048
    balanced = CamelotConfig.recall("balanced")
    assert all(getattr(cfg, f) == getattr(balanced, f) for f in cfg.to_dict())
    small = cfg.replace(slots=316)
    assert (small.recent, small.span_reserve) == (192, 105)  # "auto" kept: they follow the new slots
    assert cfg.replace(window=512).recent == 576 and cfg.replace(window=2048).recent == 0  # and the window
    assert cfg.replace(slots=252, recent=64).recent == 64
    assert CamelotConfig(recent=0, sink=0).recent == 0 and CamelotConfig(span_reserve=0).span_reserve == 0
    assert CamelotConfig(sink=0, slots=100, window=16).recent == 84
    # the tail "auto" is 128 beside the consolidating write and for the other strategies
    assert CamelotConfig(evict="age").recent == 128 and CamelotConfig(evict="age").span_reserve == 361
    for strategy in ("knn", "infllm", "sliding", "window", "recurrent"):
        other = CamelotConfig(strategy=strategy, slots=1024)
        assert (other.recent, other.span_reserve) == (128, 0), strategy
    old = CamelotConfig.consolidating()
    assert (old.slots, old.recent, old.evict, old.span_reserve, old.importance) == (2048, 128, "age", 0, "attention")
    assert CamelotConfig.paper().evict == "age" and CamelotConfig.paper().span_reserve == 0
    for bad in ("half", -1, 1.5):
        with pytest.raises(ValueError, match="recent"):
            CamelotConfig(recent=bad)


def test_recall_preset_makes_all_but_128_slots_a_surprise_reserve_and_keeps_what_is_given():
    cfg = CamelotConfig.recall(slots=892, window=512)
    assert (cfg.span_reserve, cfg.span, cfg.span_follow, cfg.importance, cfg.span_score) == (764, 8, 12, "surprise",
                                                                                             "scan")
    assert (cfg.slots, cfg.window) == (892, 512)
    assert CamelotConfig.recall().span_reserve == CamelotConfig.consolidating().slots - 128 == 1920  # its bank
    assert CamelotConfig.recall(slots=90).span_reserve == 60  # a small bank keeps a third consolidated
    assert [CamelotConfig.recall(slots=n).span_reserve for n in (1, 2)] == [0, 1]  # and at least one slot
    assert CamelotConfig.recall(span_reserve=100).span_reserve == 100  # what the user gives wins
    assert CamelotConfig.consolidating().span_reserve == 0  # the old default write is the paper's
    for bad in ("many", 0, True):
        with pytest.raises(ValueError, match="slots"):
            CamelotConfig.recall(slots=bad)


def test_recall_of_demonstrations_ranks_single_tokens_by_attention_shared_over_heads():
    cfg = CamelotConfig.recall("demonstrations", slots=2048, window=256)
    assert (cfg.span_reserve, cfg.span, cfg.span_follow, cfg.importance, cfg.span_score) == (
        1920, 1, 0, "attention", "shared")
    assert CamelotConfig.recall("facts") == CamelotConfig.recall()
    assert CamelotConfig.recall("demonstrations", span_score="sum").span_score == "sum"  # what is given wins
    kinds = "facts, balanced, demonstrations, question, question\\+facts"
    with pytest.raises(ValueError, match=f"recall kind must be one of {kinds}; got 'labels'"):
        CamelotConfig.recall("labels")


def test_balanced_recall_keeps_a_third_of_the_slots_for_facts_and_evicts_the_rest_by_use_in_the_kernel():
    from camelot.memory.rules import rule_from_config

    cfg = CamelotConfig.recall("balanced", slots=252, recent=256)
    facts = CamelotConfig.recall("facts", slots=252)
    assert (cfg.span_reserve, cfg.evict, cfg.recent) == (84, "use", 256)
    assert all(getattr(cfg, k) == getattr(facts, k) for k in ("span", "importance", "span_score"))
    assert (cfg.span_follow, facts.span_follow) == (16, 12)  # a number after a long name kept whole
    rule = rule_from_config(cfg)
    assert rule.kernel_beside_reserve and not rule.plain and not rule.use_only
    assert not rule_from_config(cfg.replace(protect=2.0)).kernel_beside_reserve  # a rule the kernel lacks
    assert CamelotConfig.recall("balanced", slots=2).span_reserve == 0


def test_a_baseline_at_the_same_budget_holds_what_camelot_holds():
    """ICL's baselines beside one camelot config: sliding caches slots + tail (sinks apart, as
    camelot's), infllm a 128-token local window and the nearest whole number of blocks."""
    from camelot.presets import at_same_budget

    cfg = CamelotConfig(window=256, slots=1148)  # 1148 slots + 896 tail + 4 sinks
    assert at_same_budget(cfg, "sliding").slots + at_same_budget(cfg, "sliding").sink == 2048
    infllm = at_same_budget(cfg, "infllm")
    assert (infllm.slots, infllm.recent, infllm.placement) == (1920, 128, "fixed")  # 15 blocks: 2052 entries
    assert at_same_budget(CamelotConfig.consolidating(window=256), "infllm").slots == 2048
    assert at_same_budget(cfg, "knn").strategy == "knn" and at_same_budget(cfg, "knn").recent == 128
