"""Hardening (issue 19) beyond the reliability table's cases (tests/reliability_hostile.py):
the data size limit and its flag, snapshot size against RAM, a save that fails mid-write."""

from __future__ import annotations

import pytest
import torch

import camelot
from camelot import CamelotConfig
from camelot.cli import UserError
from camelot.documents import load_documents
from camelot.snapshot import SnapshotError
from tests.conftest import tiny_llama

LIVE = dict(window=16, slots=8, read_top_k=2, threshold=0.5, recent=0, sink=0)


def _fed(strategy: str = "camelot"):
    cm = camelot.wrap(tiny_llama(), CamelotConfig(**LIVE, strategy=strategy))
    cm.feed(torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(0)), progress=False)
    return cm


def test_data_limit_refuses_early_and_the_flag_raises_it(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("hello world\n" * 1000)  # 12 kB
    with pytest.raises(UserError, match="limit on data"):
        load_documents(str(path), max_bytes=10_000)
    assert load_documents(str(path), max_bytes=20_000)[0].text.startswith("hello world")
    (tmp_path / "b.txt").write_text("more text\n" * 1000)  # a folder is held to the limit as a whole
    with pytest.raises(UserError, match="folder|limit on data"):
        load_documents(str(tmp_path), max_bytes=15_000)
    assert len(load_documents(str(tmp_path), max_bytes=30_000)) == 2


def test_row_files_are_held_to_the_limit(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "hello world"}\n' * 500)
    with pytest.raises(UserError, match="limit on data"):
        load_documents(str(path), max_bytes=1000)


@pytest.mark.parametrize("command", [["ppl", "--data", "x"], ["soak"], ["bench"], ["ask", "q"]])
def test_every_command_reading_data_has_the_limit_flag(command):
    from camelot.cli import build_parser
    from camelot.documents import data_limit

    args = build_parser().parse_args([*command, "--max-data-mb", "1024"])
    assert data_limit(args) == 1024 * 2**20


def test_a_snapshot_declaring_more_than_ram_is_refused_from_its_header(tmp_path, monkeypatch):
    """A knn store grows with the text, so its size is not bounded by the wrapper; the header's
    total is held against the machine's memory before any byte is read."""
    import camelot.snapshot_checks as checks

    cm = _fed("knn")
    path = cm.memory.save(tmp_path / "knn.camelot")
    monkeypatch.setattr(checks, "_physical_memory", lambda: 1000)
    monkeypatch.setattr("camelot.snapshot._read_tensors", lambda *a: pytest.fail("tensors read before the check"))
    with pytest.raises(SnapshotError, match="more than this machine's"):
        cm.memory.load(path)
    monkeypatch.undo()
    cm.memory.load(path)  # with the real memory size it loads


def test_a_save_that_fails_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    cm = _fed()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        cm.memory.save(tmp_path / "mem.camelot")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checkpoint_restores_into_its_own_wrapper_only():
    cm, other = _fed(), _fed()
    cp = cm.memory.checkpoint()
    cm.memory.restore(cp)  # its own wrapper: fine
    with pytest.raises(ValueError, match="another wrapper"):
        other.memory.restore(cp)


@pytest.mark.parametrize("call", ["score", "feed", "reset", "checkpoint", "save", "load"])
def test_calls_wait_for_the_wrapper_lock(call, tmp_path):
    """Every state-changing call of a wrapper (and of its memory view) waits while another
    thread holds the wrapper's lock: calls from two threads never interleave."""
    import threading

    cm = _fed()
    snap = cm.memory.save(tmp_path / "s.camelot")
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
    run = {"score": lambda: cm.score(ids), "feed": lambda: cm.feed(ids, progress=False), "reset": cm.reset,
           "checkpoint": lambda: cm.memory.checkpoint(), "save": lambda: cm.memory.save(tmp_path / "t.camelot"),
           "load": lambda: cm.memory.load(snap)}[call]
    done = threading.Event()
    with cm._lock:
        t = threading.Thread(target=lambda: (run(), done.set()))
        t.start()
        assert not done.wait(0.3), f"{call} ran while another thread held the wrapper"
    t.join(10)
    assert done.is_set()


@pytest.mark.parametrize("command", [["icl"], ["soak"], ["ask", "q"]])
def test_single_config_commands_take_the_write_rule_flags(command):
    """ask, icl and soak build one CamelotConfig: every write-rule field is a flag of theirs too."""
    from camelot.cli import build_parser, memory_config
    from camelot.memory.rules import RULE_FIELDS

    args = build_parser().parse_args([*command, "--span-reserve", "64", "--span", "16", "--importance", "surprise",
                                      "--evict", "use", "--reserve", "none"])
    cfg = memory_config(args)
    assert (cfg.span_reserve, cfg.span, cfg.importance, cfg.evict, cfg.reserve) == (64, 16, "surprise", "use", None)
    assert all(hasattr(args, name) for name in RULE_FIELDS)


@pytest.mark.parametrize("command", [["icl"], ["soak"], ["ask", "q"]])
def test_recall_flag_gives_the_recall_preset_and_moved_rule_flags_win(command):
    from camelot.cli import build_parser, memory_config
    from camelot.config import CamelotConfig
    from camelot.memory.rules import RULE_FIELDS

    parser = build_parser()
    plain = memory_config(parser.parse_args([*command, "--slots", "892"]))
    cfg = memory_config(parser.parse_args([*command, "--slots", "892", "--recall"]))
    assert plain.span_reserve == 297 and cfg.span_reserve == 764  # the default's third; all but 128
    # --recent auto: the tail each write was measured with (the default's: window + tail = sinks + slots)
    assert (plain.recent, cfg.recent) == (892 + 4 - plain.window, 128)
    # the command's own settings (window, placement...) kept, the write rule and tail the preset's
    given = {k: v for k, v in plain.to_dict().items() if k not in (*RULE_FIELDS, "recent")}
    assert cfg == CamelotConfig.recall(**given)
    moved = memory_config(parser.parse_args([*command, "--slots", "892", "--recall", "--span-score", "peak"]))
    assert (moved.span_score, moved.span_reserve, moved.importance) == ("peak", 764, "surprise")
    demos = memory_config(parser.parse_args([*command, "--slots", "892", "--recall-demos"]))
    assert demos == CamelotConfig.recall("demonstrations", **given)
    assert demos.importance == "attention" != cfg.importance
    balanced = memory_config(parser.parse_args([*command, "--slots", "892", "--recent", "892", "--recall-balanced"]))
    assert (balanced.span_reserve, balanced.evict, balanced.importance) == (297, "use", "surprise")
    assert balanced.recent == 892
    assert memory_config(parser.parse_args([*command, "--slots", "892", "--recall-balanced"])) == plain
    old = memory_config(parser.parse_args([*command, "--slots", "892", "--consolidating"]))
    assert old == CamelotConfig.consolidating(**given) and (old.evict, old.span_reserve, old.recent) == ("age", 0, 128)
    kept = memory_config(parser.parse_args([*command, "--slots", "892", "--recall-balanced", "--evict", "merge"]))
    assert kept.evict == "merge"  # a rule flag moved off its default still wins
