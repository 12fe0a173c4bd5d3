"""feed(rank=False): scaffolding (a chat template's opening, a task's instruction) is read like any
text but counts no surprise, so a reserve ranked by surprise keeps its places for the document.
A chat template's system prompt is surprising only because nothing precedes it: it took 38 of
Qwen's reserve places at RULER's budget (docs/retrieval.md)."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot.ask import AskSession
from tests.conftest import tiny_llama
from tests.test_ask import TEXT, tiny_tokenizer
from tests.test_window_surprise import SURPRISE, _handed, _ids

OPENING = 40  # tokens of scaffolding; the sinks (2) and what stays raw are never handed to the write


@pytest.mark.parametrize("source", ["memory", "logit"])
def test_scaffolding_is_handed_to_the_write_with_no_surprise(source):
    ids = _ids(96)
    handed = {}
    for split in (False, True):
        cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**SURPRISE, surprise_from=source))
        seen = _handed(cm)
        if split:
            cm.feed(ids[:, :OPENING], progress=False, rank=False)
            cm.feed(ids[:, OPENING:], progress=False)
        else:
            cm.feed(ids, progress=False)
        handed[split] = torch.cat(seen)
        cm.unwrap()
    first = OPENING - 2  # the first handed token is the one after the sinks
    assert handed[True].numel() == handed[False].numel() > first
    assert (handed[True][:first] == 0).all()
    assert (handed[False][:first] > 0).all()  # ranked, the same tokens count their surprise
    assert (handed[True][first:] > 0).all()  # the document after it does, its first token included


def test_the_flag_is_restored_whatever_happens():
    cm = camelot.wrap(tiny_llama(), camelot.CamelotConfig(**SURPRISE))
    with pytest.raises(ValueError):
        cm.feed(torch.full((1, 8), 10_000), progress=False, rank=False)  # beyond the vocabulary
    assert cm.surprise.ranked
    with cm.surprise.ranking(False), pytest.raises(RuntimeError):
        raise RuntimeError
    assert cm.surprise.ranked
    with pytest.raises(TypeError, match="rank must be True or False"):
        cm.feed(torch.zeros(1, 4, dtype=torch.long), progress=False, rank="no")
    assert cm.surprise.ranked and cm.open_len == 0  # refused before reading anything
    cm.unwrap()


def test_ask_reads_the_template_opening_as_scaffolding():
    """The opening before the document (`<|im_start|>user\\n`) goes in unranked, the document ranked,
    and the two feeds are the whole conversation so far."""
    tok = tiny_tokenizer()
    cm = camelot.wrap(tiny_llama(vocab=len(tok)), camelot.CamelotConfig(**SURPRISE))
    feeds, feed = [], cm.feed

    def recording(ids, progress=True, rank=True):
        feeds.append((ids[0].tolist(), rank))
        return feed(ids, progress=progress, rank=rank)

    cm.feed = recording
    session = AskSession(cm, tok, generation={"max_new_tokens": 2})
    n = session.read(TEXT, progress=False)
    assert [rank for _, rank in feeds] == [False, True]
    assert tok.decode(feeds[0][0]) == "<|im_start|>user\n"
    assert len(feeds[0][0]) + len(feeds[1][0]) == n == session.tokens_read
    cm.unwrap()
