"""surprise_reach: the logit credit counts what the raw context beyond a reach gave a token, not
only what memory gave (camelot/attention.py, `credited`). A needle that copies its template from
a needle still in the raw tail costs the model almost nothing; to a reader of only its last
`reach` tokens it is as surprising as the first (docs/retrieval.md, "What the misses at 1/8 have
in common")."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.attention import credited
from tests.conftest import tiny_llama
from tests.test_logit_surprise import _noted
from tests.test_window_surprise import SURPRISE, _ids


def _brute(probs: torch.Tensor, vals: torch.Tensor, out: torch.Tensor, n_plain: int, l0: int, m: int, p: int,
           reach: int) -> torch.Tensor:
    """out minus attention over the keys each query keeps (open and tail keys within reach, and
    the sinks), one query at a time."""
    want = torch.empty_like(out)
    pos = list(range(l0 + m)) + list(range(-p, 0))
    for i in range(m):
        q = l0 + i
        local = [j for j in range(n_plain) if j >= l0 + m + p or q - pos[j] <= reach]
        w = probs[..., i, local]
        local_out = (w[..., None] * vals[:, :, None, local]).sum(-2) / w.sum(-1, keepdim=True)
        want[..., i, :] = out[..., i, :] - local_out
    return want


@pytest.mark.parametrize("reach", [1, 3, 7, 100])
@pytest.mark.parametrize("l0", [0, 4])
def test_the_credit_is_out_minus_attention_within_reach(reach, l0):
    torch.manual_seed(0)
    b, hkv, g, m, p, ns, s, dv = 2, 2, 3, 5, 6, 2, 7, 4
    n_plain = l0 + m + p + ns
    logits = torch.randn(b, hkv, g, m, n_plain + s)
    causal = torch.arange(l0 + m)[None, :] > (l0 + torch.arange(m))[:, None]  # the open segment's future
    logits[..., : l0 + m] = logits[..., : l0 + m].masked_fill(causal, float("-inf"))
    probs = logits.softmax(-1)
    vals = torch.randn(b, hkv, n_plain + s, dv)
    out = torch.einsum("bhgmn,bhnd->bhgmd", probs, vals)
    plain = torch.einsum("bhgmn,bhnd->bhgmd", probs[..., :n_plain], vals[:, :, :n_plain])
    got = credited(out, plain, probs, vals, n_plain, l0, m, p, reach)
    assert torch.allclose(got, _brute(probs, vals, out, n_plain, l0, m, p, reach), atol=1e-5)
    memory_only = credited(out, plain, probs, vals, n_plain, l0, m, p, None)
    assert torch.allclose(memory_only, out - plain / probs[..., :n_plain].sum(-1, keepdim=True), atol=1e-6)
    if reach < l0 + m + p - 1:  # some key is out of reach: the credit is another
        assert not torch.allclose(got, memory_only, atol=1e-3)


def _noted_run(reach: int | None) -> torch.Tensor:
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**SURPRISE, surprise_from="logit", surprise_reach=reach))
    seen = _noted(cm)
    cm.score(_ids(96, rows=2))
    cm.unwrap()
    return torch.cat(seen, 1)


def test_a_reach_beyond_every_key_is_the_memory_credit_and_a_short_one_credits_the_far_context():
    none, far, short = _noted_run(None), _noted_run(10_000), _noted_run(4)
    assert torch.equal(none, far)
    # a token's first 5 keys are within reach of it (and the memory is empty): nothing changes
    assert torch.allclose(short[:, :5], none[:, :5], atol=1e-6)
    gained = short - none
    assert gained[:, 5:].abs().gt(1e-3).sum() > 20  # the raw context beyond 4 tokens is credited


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_reaches_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match="surprise_reach"):
        camelot.CamelotConfig(**SURPRISE, surprise_reach=bad)


@pytest.mark.parametrize("source", ["memory", "window"])
def test_a_reach_without_the_logit_credit_is_refused(source):
    with pytest.raises(ValueError, match="surprise_reach"):
        camelot.CamelotConfig(**SURPRISE, surprise_from=source, surprise_reach=64)
