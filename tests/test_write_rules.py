"""The slot bank's write rules beyond the paper's (camelot/memory/rules.py)."""

from __future__ import annotations

import pytest
import torch

from camelot.memory import SlotBank
from camelot.memory.rules import WriteRule
from camelot.reads import ReadAttribution

STATE = ("keys", "values", "counts", "ages", "telemetry")


def _unit(*xs: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float32), dim=-1)


def _one(k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, D] keys -> [1, 1, T, D] (values: the keys again unless given)."""
    return k[None, None], (k if v is None else v)[None, None]


@pytest.mark.parametrize("slots,t,mode", [(5, 20, "segment"), (16, 3, "segment"), (40, 8, "segment"), (6, 4, "token")])
def test_general_path_with_the_age_rule_equals_the_paper_write(slots, t, mode):
    """The rules' placement (one sort of slots and novel tokens together) with the paper's
    eviction gives exactly the reference write (C kernel / torch), overflow and NaN included."""
    torch.manual_seed(slots)
    a = SlotBank(slots, 0.6, write_mode=mode)
    b = SlotBank(slots, 0.6, write_mode=mode, rule=WriteRule(value_threshold=-1.0))  # not plain: torch rules path
    assert a.rule.plain and not b.rule.plain
    protos = torch.randn(6, 8)
    for seg in range(6):
        k = protos[torch.randint(0, 6, (2, 3, t))] + 0.3 * torch.randn(2, 3, t, 8)
        v = torch.randn(2, 3, t, 4)
        if seg == 2:
            k[0, 1, 1, 0] = float("nan")
        a.write(k, v)
        b.write(k, v, received=torch.rand(2, 3, t))
        for n in STATE:
            assert torch.allclose(getattr(a, n).float(), getattr(b, n).float(), atol=1e-6), (seg, n)


def _flood(bank: SlotBank, n: int, d: int = 16, imp: float = 0.1, seed: int = 1) -> None:
    """n mutually dissimilar (novel) tokens of low importance, one segment of 4 at a time."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n // 4):
        k = torch.randn(4, d, generator=g)
        bank.write(*_one(k), received=torch.full((1, 1, 4), imp))


def test_a_rare_important_key_survives_a_flood_under_eviction_by_use_but_not_by_age():
    rare = torch.zeros(1, 16)
    rare[0, 0] = 10.0
    kept = {}
    for evict in ("age", "use"):
        bank = SlotBank(4, 0.99, rule=WriteRule(evict=evict, use_decay=0.999))
        bank.write(*_one(rare), received=torch.full((1, 1, 1), 5.0))
        _flood(bank, 40)
        kept[evict] = bool(((bank.keys[0, 0, :4] - rare).abs().amax(-1) < 1e-6).any())
    assert kept == {"age": False, "use": True}


def test_eviction_by_use_drops_a_novel_token_less_important_than_every_slot():
    bank = SlotBank(2, 0.99, rule=WriteRule(evict="use"))
    bank.write(*_one(torch.eye(4)[:2]), received=torch.tensor([[[3.0, 2.0]]]))
    bank.write(*_one(torch.eye(4)[2:]), received=torch.tensor([[[1.0, 2.5]]]))
    # token 2 (importance 1) loses to both slots; token 3 (2.5) replaces the slot of importance 2
    assert torch.equal(bank.keys[0, 0, :2], torch.eye(4)[[0, 3]])
    assert bank.telemetry.tolist() == [0, 2, 1, 1, 0]


def test_decayed_scores_let_a_slot_that_was_important_long_ago_go():
    """Undecayed, a slot whose tokens were attended once stays for good; with the default decay
    (0.995 per written token) a novel token of lower importance takes its place ~a few hundred
    tokens later (what made `evict=use` beat the age rule on Qwen: docs/memory_write.md)."""
    old = torch.zeros(1, 16)
    old[0, 0] = 10.0
    kept = {}
    for decay in (1.0, WriteRule.use_decay):
        bank = SlotBank(4, 0.99, rule=WriteRule(evict="use", use_decay=decay))
        bank.write(*_one(old), received=torch.full((1, 1, 1), 2.0))
        _flood(bank, 400, imp=0.5)
        kept[decay] = bool(((bank.keys[0, 0, :4] - old).abs().amax(-1) < 1e-6).any())
    assert WriteRule.use_decay == 0.995 and kept == {1.0: True, 0.995: False}


def test_reads_raise_a_slot_score_and_save_it_from_eviction():
    bank = SlotBank(2, 0.99, rule=WriteRule(evict="use", use_decay=1.0))
    bank.write(*_one(torch.eye(4)[:2]), received=torch.tensor([[[1.0, 1.0]]]))
    bank.observe_reads(torch.tensor([[[2.0, 0.0]]]))
    bank.write(*_one(torch.eye(4)[2:3]), received=torch.tensor([[[1.5]]]))
    assert torch.equal(bank.keys[0, 0, :2], torch.eye(4)[[0, 2]])
    assert bank.score[0, 0, :2].tolist() == [3.0, 1.5]


def test_pair_merging_frees_a_place_with_exact_count_weighted_arithmetic():
    a, a2, b, c = _unit(1, 0, 0, 0), _unit(1, 0.2, 0, 0), _unit(0, 1, 0, 0), _unit(0, 0, 1, 0)
    bank = SlotBank(3, 0.999, rule=WriteRule(evict="merge"))
    # slot 0 = a with count 3, slot 1 = b, slot 2 = a2 (count 1)
    bank.write(*_one(torch.stack([a, b, a2]), torch.stack([a, b, a2]) * 2))
    bank.write(*_one(torch.stack([a, a])))
    assert bank.counts[0, 0, :3].tolist() == [3, 1, 1]
    bank.write(*_one(c[None], c[None] * 2))
    # the nearest pair (0, 2) folded into slot 0; c took the freed slot 2; b is untouched
    assert bank.counts[0, 0, :3].tolist() == [4, 1, 1]
    want_k = (3 * bank_key_before(a, a) + a2) / 4
    assert torch.allclose(bank.keys[0, 0, 0], want_k, atol=1e-7)
    assert torch.allclose(bank.values[0, 0, 0], (3 * (2 * a + a + a) / 3 + 2 * a2) / 4, atol=1e-6)
    assert torch.equal(bank.keys[0, 0, 1], b) and torch.equal(bank.keys[0, 0, 2], c)
    assert bank.telemetry.tolist() == [2, 4, 0, 0, 0]  # c took a freed place: new, nothing evicted


def bank_key_before(a: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Slot 0's key after a (value 2a) took two merges of `merged`: (a + 2 merged) / 3."""
    return (a + 2 * merged) / 3


def test_a_surprising_token_neither_merges_nor_takes_merges_and_is_evicted_last():
    rule = WriteRule(protect=1.5)
    bank = SlotBank(3, 0.9, rule=rule)
    x = _unit(1, 0, 0, 0)
    bank.write(*_one(x[None]), received=torch.tensor([[[1.0]]]))
    # the same key, but surprising (importance 9 >= 1.5 x mean 5): a slot of its own, protected
    bank.write(*_one(torch.stack([x, _unit(0, 1, 0, 0)])), received=torch.tensor([[[9.0, 1.0]]]))
    assert bank.counts[0, 0, :3].tolist() == [1, 1, 1] and bank.pinned[0, 0, :3].tolist() == [False, True, False]
    # a plain token like x merges into slot 0, not into the protected slot 1
    bank.write(*_one(x[None]), received=torch.tensor([[[1.0]]]))
    assert bank.counts[0, 0, :3].tolist() == [2, 1, 1]
    _flood(bank, 40, d=4, imp=1.0)
    assert torch.equal(bank.keys[0, 0, 1], x) and bool(bank.pinned[0, 0, 1])


def test_the_reserve_keeps_only_the_most_important_protected_slots():
    bank = SlotBank(4, 0.99, rule=WriteRule(protect=1.5, reserve=1))
    imp = torch.tensor([[[9.0, 1.0, 1.0, 5.0, 1.0, 1.0]]])  # mean 3: tokens 0 and 3 are surprising
    bank.write(*_one(torch.eye(6)), received=imp)
    pinned = bank.pinned[0, 0, :4]
    assert int(pinned.sum()) == 1
    assert torch.equal(bank.keys[0, 0, :4][pinned][0], torch.eye(6)[0])


def test_value_test_keeps_a_token_with_a_foreign_value_apart():
    x = _unit(1, 0, 0, 0)
    for vt, want in ((None, [2, 0]), (0.5, [1, 1])):
        bank = SlotBank(2, 0.9, rule=WriteRule(value_threshold=vt, use_decay=0.9))
        bank.write(*_one(x[None], _unit(1, 0)[None]))
        bank.write(*_one(x[None], _unit(0, 1)[None]))
        assert bank.counts[0, 0, :2].tolist() == want


def test_merge_target_sets_each_heads_threshold_from_its_similarities():
    torch.manual_seed(0)
    bank = SlotBank(64, 0.99, rule=WriteRule(merge_target=0.25))
    bank.write(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 4))
    k = torch.randn(1, 2, 20, 16)
    before = bank.telemetry.clone()
    bank.write(k, torch.randn(1, 2, 20, 4))
    merged = int(bank.telemetry[0] - before[0])
    assert merged == 2 * 5  # a quarter of each head's 20 tokens, though none reaches 0.99


def test_read_mass_sums_each_slots_share_over_queries_and_heads():
    bank = SlotBank(3, 0.9, rule=WriteRule(evict="use"))
    bank.write(torch.eye(3)[None, None].expand(1, 2, 3, 3).contiguous(), torch.ones(1, 2, 3, 1))
    assert bank.wants_received and not SlotBank(3, 0.9).wants_received
    # B=1, Hkv=2, G=2, m=1, two slots read per query
    slots = torch.tensor([2, 1]).expand(1, 2, 2, 1, 2)
    bank.observe_reads(ReadAttribution(slots, torch.tensor([0.25, 0.5]).expand(1, 2, 2, 1, 2)).mass(3))
    assert torch.allclose(bank.score[0, :, :3], torch.tensor([0.0, 1.0, 0.5]).expand(2, 3))


def test_a_read_of_every_slot_adds_the_same_mass_as_the_scatter_over_its_entries():
    g = torch.Generator().manual_seed(1)
    banks = [SlotBank(5, 0.9, rule=WriteRule(evict="use")) for _ in range(2)]
    for bank in banks:
        bank.write(torch.eye(5)[None, None].expand(1, 2, 5, 5).contiguous(), torch.ones(1, 2, 5, 1))
    weights = torch.rand(1, 2, 3, 4, 5, generator=g)
    slots = torch.arange(5).expand(1, 2, 3, 4, 5)
    banks[0].observe_reads(ReadAttribution(slots, weights).mass(5))
    banks[1].observe_reads(ReadAttribution(slots, weights, every=True).mass(5))
    assert banks[1].score[..., :5].abs().sum() > 0
    assert torch.allclose(banks[0].score, banks[1].score, atol=1e-6)


def test_a_wrapped_model_with_a_scored_rule_feeds_importance_and_reads_to_the_bank():
    import camelot
    from tests.conftest import tiny_llama

    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(window=16, slots=8, recent=16, sink=2, evict="use",
                                                          protect=1.2, use_decay=0.99, importance="attention",
                                                          span_reserve=0))
    ids = torch.randint(0, 101, (1, 120), generator=torch.Generator().manual_seed(0))
    a = cm.score(ids).token_nll
    banks = [rt.state.memory for rt in cm.runtimes]
    assert all(bool((b.score[..., :8] > 0).all()) for b in banks)  # every slot scored by attention
    assert any(bool(b.pinned.any()) for b in banks)
    changed = ids.clone()
    changed[0, 100] = (changed[0, 100] + 7) % 101
    b = cm.score(changed).token_nll
    assert torch.equal(a[:, :99], b[:, :99])  # still causal


def test_importance_by_surprise_hands_each_token_its_nll_under_the_model_to_every_layer():
    import camelot
    from tests.conftest import tiny_llama

    # span_follow: the carried context starts empty, saved as the mark a float32 holds (-1.00000002e30),
    # which the check refused as "below -1e30" until 2026-12-06
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(window=16, slots=12, recent=16, sink=2, span_reserve=8,
                                                          span=4, span_score="sum", importance="surprise",
                                                          span_follow=12, surprise_from="memory"))
    banks = [rt.state.memory for rt in cm.runtimes]
    assert all(b.wants_surprise and not b.wants_received for b in banks)
    got: dict[int, list[torch.Tensor]] = {id(b): [] for b in banks}
    after: dict[int, list[torch.Tensor]] = {id(b): [] for b in banks}
    for b in banks:  # record what each layer's bank is handed as importance, and as the tokens' after it
        b.write = (lambda f, out, nxt: lambda k, v, received=None, following=None: (
            out.append(received), nxt.append(following), f(k, v, received=received, following=following))[2])(
            b.write, got[id(b)], after[id(b)])
    ids = torch.randint(0, 101, (1, 90), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second document after score()'s reset: nothing carried over
        nll = cm.score(ids).token_nll[0]
        for b in banks:
            seen = torch.cat(got[id(b)], dim=2)
            assert torch.allclose(seen[0, 0], nll[1 : 1 + seen.shape[2]], atol=1e-5)  # token i: NLL of i (sinks 0, 1)
            assert torch.equal(seen[0, 0], seen[0, 1])  # the same for every head
            end = 1
            for r, f in zip(got[id(b)], after[id(b)]):  # the raw tail's tokens that follow, in order
                end += r.shape[2]
                assert f.shape[2] == 16 and torch.allclose(f[0, 0], nll[end : end + 16], atol=1e-5)
            got[id(b)].clear()
            after[id(b)].clear()
    cm.reset()
    cm.feed(ids[:, :21], progress=False)  # in pieces that cut a step: the first token of a step is scored too
    cm.feed(ids[:, 21:], progress=False)
    seen = torch.cat(got[id(banks[0])], dim=2)[0, 0]
    assert seen.numel() == 90 - 2 - 16 - 10 and torch.allclose(seen, nll[1 : 1 + seen.numel()], atol=1e-5)


def test_a_checkpoint_and_a_snapshot_carry_the_last_prediction(tmp_path):
    """The first token of the next step is scored from the previous step's last row: restore and
    load bring back the saved one, so a continuation's importance does not depend on what was
    read in between (tests/test_snapshot_importance.py: the continuation is exact)."""
    import camelot
    from tests.conftest import tiny_llama

    # span_follow: the carried context starts empty, saved as the mark a float32 holds (-1.00000002e30),
    # which the check refused as "below -1e30" until 2026-12-06
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(window=16, slots=12, recent=16, sink=2, span_reserve=8,
                                                          span=4, span_score="sum", importance="surprise",
                                                          span_follow=12, surprise_from="memory"))
    ids = torch.randint(0, 101, (1, 90), generator=torch.Generator().manual_seed(0))
    cm.feed(ids[:, :40], progress=False)
    cp = cm.memory.checkpoint()
    held = cm.surprise.last_logp.clone()
    cm.feed(ids[:, 40:], progress=False)
    assert not torch.equal(cm.surprise.last_logp, held)
    cm.memory.restore(cp)
    assert torch.equal(cm.surprise.last_logp, held)
    path = cm.memory.save(tmp_path / "s.camelot")
    cm.feed(ids[:, 40:], progress=False)
    assert not torch.equal(cm.surprise.last_logp, held)
    cm.memory.load(path)
    assert torch.equal(cm.surprise.last_logp, held)


@pytest.mark.parametrize("bad", [{"evict": "lru"}, {"protect": -1}, {"reserve": -1}, {"use_decay": 0},
                                 {"value_threshold": 2}, {"merge_target": 1.5},
                                 {"importance": "nll"}, {"span_apart": -1}, {"span_apart": True}])
def test_bad_rules_are_refused(bad):
    with pytest.raises(ValueError):
        WriteRule(**bad)


def test_balanced_recall_runs_its_consolidated_half_in_the_kernel_and_stays_causal(monkeypatch):
    import camelot
    from camelot import topk as native
    from tests.conftest import tiny_llama

    if native.native_library() is None:
        pytest.skip("no C compiler: the torch write is the only one")
    used = []
    real = SlotBank._native_bookkeeping
    monkeypatch.setattr(SlotBank, "_native_bookkeeping", lambda self, *a: used.append(real(self, *a)) or used[-1])
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig.recall("balanced", window=16, slots=16, recent=16, sink=2))
    ids = torch.randint(0, 101, (1, 160), generator=torch.Generator().manual_seed(0))
    a = cm.score(ids).token_nll
    banks = [rt.state.memory for rt in cm.runtimes]
    reserve = banks[0].rule.span_reserve
    assert reserve == 5 and used and all(used)  # every write's consolidated part in the kernel
    assert all(bool((b.span_score[..., :reserve] > float("-inf")).any()) for b in banks)  # the reserve holds windows
    assert all(bool((b.counts[..., : 16 - reserve] > 0).all()) for b in banks)  # the consolidated part is full
    changed = ids.clone()
    changed[0, 140] = (changed[0, 140] + 7) % 101
    assert torch.equal(a[:, :139], cm.score(changed).token_nll[:, :139])
