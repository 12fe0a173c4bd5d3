"""Fuzzing: random bytes into the CLI's data loader and the snapshot loader, random settings into
CamelotConfig, wrap and the `camelot ppl` command line. Each must end in a result or in its one
intended error (UserError / SnapshotError / ValueError, or a one-line CLI error), never in
another exception, and a refused snapshot must leave the live memory bit for bit as it was.

Bounded: hypothesis with no deadline and few examples per test, the whole file well under 30 s
on an idle machine."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import camelot
from camelot import CamelotConfig
from camelot.cli import UserError
from camelot.documents import load_documents
from camelot.snapshot import SnapshotError
from tests.conftest import tiny_llama
from tests.reliability_cases import LIVE, Workspace, doc, memory_state, model_state, same_state

FUZZ = settings(deadline=None, max_examples=25, suppress_health_check=list(HealthCheck), derandomize=True)
FEW = settings(FUZZ, max_examples=8)

binary = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),  # valid UTF-8, sometimes blank
    st.tuples(st.text(max_size=50), st.binary(max_size=20)).map(lambda p: p[0].encode() + p[1]),  # text, then junk
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("fuzz"))


class Live(tuple):
    """(wrapper, snapshot bytes), with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"Live(wrapper, snapshot of {len(self[1])} bytes)"


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    """A wrapper with memory in it and a valid snapshot of it (the seed of the mutations)."""
    cm = camelot.wrap(tiny_llama(), CamelotConfig(**LIVE))
    cm.feed(doc(40), progress=False)
    path = cm.memory.save(tmp_path_factory.mktemp("snap") / "live.safetensors")
    return Live((cm, path.read_bytes()))


# Metadata keys whose malformed values still escape as a plain ValueError: left out of the
# mutations below and pinned by test_malformed_open_len_is_refused_as_a_snapshot_error.


def _counter() -> Any:
    n = [0]

    def nxt() -> int:
        n[0] += 1
        return n[0]
    return nxt


_next = _counter()



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread (a second one only waits on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------------------- data loader
@FUZZ
@given(data=binary, suffix=st.sampled_from(["", ".txt", ".md", ".TXT", ".log"]))
def test_random_bytes_into_the_text_loader(tmp_path_factory, data, suffix):
    folder = tmp_path_factory.mktemp("bytes")
    path = folder / f"doc{suffix}"
    path.write_bytes(data)
    for spec in (path, folder):  # the file itself, and as a folder of documents
        try:
            docs = load_documents(str(spec))
        except UserError as e:
            assert str(e) and "\n" not in str(e)
            continue
        if spec == folder and suffix.lower() != ".txt":
            pytest.fail("a folder without .txt files was accepted")
        assert len(docs) == 1 and docs[0].text == data.decode("utf-8") and docs[0].text.strip()


@FEW
@given(data=binary, suffix=st.sampled_from([".jsonl", ".json", ".parquet"]))
def test_random_bytes_into_the_row_loaders(tmp_path_factory, monkeypatch_module, data, suffix):
    path = tmp_path_factory.mktemp("rows") / f"rows{suffix}"
    path.write_bytes(data)
    try:
        docs = load_documents(str(path))
    except UserError as e:
        assert str(e)
        return
    assert all(isinstance(d.text, str) and d.text.strip() for d in docs)


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """Keep the `datasets` cache of fuzzed row files out of the user's ~/.cache."""
    import datasets.config

    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", Path(cache))
    yield mp
    mp.undo()


@FEW
@given(data=binary)
def test_random_bytes_through_the_ppl_command(workspace, data):
    """The whole CLI path: exit 0 with results, or exit 2 with one line on stderr."""
    from tests.reliability_cases import Ctx

    ctx = Ctx(workspace, f"cli{_next()}")
    out = ctx.ppl(ctx.file("doc.txt", data), "--strategies", "window,camelot", "--window", "8", "--slots", "4",
                  "--read-top-k", "2")
    assert out.rc in (0, 2), out.stderr
    event(f"exit {out.rc}")
    if out.rc == 2:
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    else:
        assert (ctx.tmp / "out" / "results.json").exists()


# ---------------------------------------------------------------------------- snapshot loader
def _load_refused_or_valid(cm, path: Path) -> str:
    before = memory_state(cm)
    try:
        cm.memory.load(path)
    except SnapshotError as e:
        assert same_state(memory_state(cm), before), "a refused snapshot changed the memory"
        assert str(e)
        return "refused"
    for rt in cm.runtimes:  # accepted: whatever it holds must be a usable memory
        st_ = rt.state.memory.state_dict()
        if st_:
            assert torch.isfinite(st_["keys"]).all() and bool((st_["counts"] >= 0).all())
    return "loaded"


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_into_the_snapshot_loader(tmp_path_factory, live, data):
    cm, _ = live
    path = tmp_path_factory.mktemp("snapfuzz") / "x.safetensors"
    path.write_bytes(data)
    assert _load_refused_or_valid(cm, path) == "refused"


@FUZZ
@given(data=st.data())
def test_damaged_snapshots_are_refused_or_harmless(tmp_path_factory, live, data):
    """A valid snapshot truncated, with bytes overwritten, or with its header's metadata values
    replaced: refused with SnapshotError (memory untouched) or, where the damage is harmless
    (e.g. the camelot_version note), loaded as a valid memory."""
    cm, good = live
    kind = data.draw(st.sampled_from(["truncate", "overwrite", "metadata", "header_length"]))
    raw = bytearray(good)
    (n,) = struct.unpack("<Q", good[:8])
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "overwrite":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "header_length":
        raw[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2 * n), st.integers(0, 2**64 - 1))))
    else:
        header = json.loads(good[8 : 8 + n])
        meta = header["__metadata__"]
        key = data.draw(st.sampled_from(sorted(meta)))
        meta[key] = data.draw(st.one_of(
            st.text(max_size=12), st.integers(-5, 10**6).map(str), st.sampled_from(["null", "[]", "{}", "nan", "-1"]),
            st.just(json.dumps({**json.loads(meta.get("config", "{}") or "{}"), "slots": 3}))))
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        raw = bytearray(struct.pack("<Q", len(body)) + body + good[8 + n :])
    path = tmp_path_factory.mktemp("damaged") / f"{kind}.safetensors"
    path.write_bytes(bytes(raw))
    outcome = _load_refused_or_valid(cm, path)
    event(f"{kind}: {outcome}")
    if kind in ("truncate", "header_length") or (kind == "overwrite" and bytes(raw) != good and
                                                  _in_tensor_bytes(good, raw, n)):
        assert outcome == "refused", kind


def test_malformed_open_len_is_refused_as_a_snapshot_error(tmp_path, live):
    cm, good = live
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    header["__metadata__"]["open_len"] = "eight"
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path = tmp_path / "bad_open_len.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + good[8 + n :])
    before = memory_state(cm)
    with pytest.raises(ValueError) as info:
        cm.memory.load(path)
    assert same_state(memory_state(cm), before)
    assert isinstance(info.value, SnapshotError), f"plain {type(info.value).__name__}: {info.value}"


def _in_tensor_bytes(good: bytes, raw: bytearray, n: int) -> bool:
    """Whether some overwritten byte lies in the tensor data (after the header): the digest
    must catch it."""
    return any(a != b for a, b in zip(good[8 + n :], raw[8 + n :]))


# ---------------------------------------------------------------------------- random settings
any_value = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
    st.text(max_size=6), st.sampled_from(["camelot", "knn", "torch", "faiss", "token", "recency", "bfloat16"]),
    st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

FIELDS = ["window", "slots", "threshold", "read_top_k", "layers", "strategy", "search", "count_bias",
          "memory_distance", "placement", "write_mode", "memory_dtype"]


@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(FIELDS), any_value, max_size=5))
def test_random_settings_into_camelot_config(kwargs):
    try:
        cfg = CamelotConfig(**kwargs)
    except ValueError as e:
        assert str(e)
        event("refused")
        return
    event("accepted")
    cfg.validate()  # an accepted config stays valid, and a round trip through a dict keeps it
    assert CamelotConfig(**cfg.to_dict()) == cfg
    assert isinstance(cfg.count_bias, float) and -1 <= cfg.threshold <= 1 and cfg.window >= 1 and cfg.slots >= 1


small_config = st.fixed_dictionaries({
    "window": st.integers(1, 40), "slots": st.integers(1, 20), "threshold": st.floats(-1, 1),
    "read_top_k": st.integers(1, 20), "strategy": st.sampled_from(["camelot", "knn", "window", "recurrent", "sliding"]),
}, optional={
    "layers": st.lists(st.integers(0, 3), min_size=1, max_size=3), "count_bias": st.booleans(),
    "memory_distance": st.integers(0, 2000), "placement": st.sampled_from(["fixed", "recency"]),
    "write_mode": st.sampled_from(["segment", "token"]), "memory_dtype": st.sampled_from(["float32", "bfloat16"]),
})


@pytest.fixture(scope="module")
def short_model():
    return tiny_llama(max_pos=48)


@FUZZ
@given(kwargs=small_config, n=st.integers(1, 70))
def test_random_configs_through_wrap_and_score(short_model, kwargs, n):
    """Valid-looking configs on a 2-layer model with 48 positions: wrap refuses (ValueError, model
    untouched) or the wrapper scores any document length with finite losses."""
    try:
        cfg = CamelotConfig(**kwargs)
    except ValueError:
        return  # e.g. top_k > slots: covered above
    before = model_state(short_model)
    try:
        cm = camelot.wrap(short_model, cfg)
    except ValueError as e:
        event("wrap refused")
        assert model_state(short_model) == before and str(e)
        assert cfg.window > 48 or any(i >= 2 for i in cfg.layers or [])
        return
    try:
        event("scored")
        out = cm.score(doc(n, seed=n))
        assert out.token_nll.shape == (1, n - 1)
        assert torch.isfinite(out.token_nll).all()
        assert n < 2 or math.isfinite(out.perplexity)
    finally:
        cm.unwrap()
    assert model_state(short_model) == before


cli_value = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["abc", "", "nan", "inf", "1e9", "0.5", ",", "2,",
                                                                    "4,8", "-1.5", "on,off", "999999999999"]))


@FEW
@given(opts=st.dictionaries(st.sampled_from(["--window", "--slots", "--threshold", "--read-top-k", "--count-bias",
                                             "--memory-distance", "--layers", "--max-tokens", "--placement"]),
                            cli_value, max_size=3))
def test_random_settings_through_the_ppl_command(workspace, opts):
    from tests.reliability_cases import Ctx

    ctx = Ctx(workspace, f"opts{_next()}")
    argv = [x for kv in opts.items() for x in kv]
    out = ctx.ppl(ctx.file("doc.txt", "the quick brown fox jumps over the lazy dog. " * 3), "--strategies",
                  "window,camelot", *argv)
    assert out.rc in (0, 2, 3), out.stderr
    event(f"exit {out.rc}")
    if out.rc:  # one error line; argparse's own type errors put its usage text above it
        assert "Traceback" not in out.stderr and out.stderr.splitlines()[-1].startswith("camelot ppl: "), out.stderr
        assert len(out.stderr.splitlines()) == 1 or out.stderr.startswith("usage:"), out.stderr
