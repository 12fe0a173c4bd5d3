"""Bad-input cases for camelot: one list (`CASES`) that the tests run and that
scripts/reliability_table.py turns into the table in docs/reliability.md.

Every case states what must happen: a clear refusal (`Refused`: an exception of a given type,
raised from camelot's own code, whose message names the problem), a one-line CLI error
(`CliRefused`), or a documented result (`Returns`). A case that shows a bug in a file owned
elsewhere carries `xfail` (the reason and the fix): the test runs it as a strict xfail, so the
fix turns it into a failure that asks to drop the mark. Cases that run against a live wrapper
(`WATCH_MEMORY`) also prove the refused call left the memory bit for bit as it was.

The live wrapper is a tiny random llama (2 layers, 2 KV heads) with window 16 and 8 slots that
has read 40 tokens: two segments consolidated in memory (with evictions), 8 in the open window.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import camelot
from camelot import CamelotConfig
from camelot.presets import CONSOLIDATING
from camelot.snapshot import SnapshotError
from tests.conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
# the consolidating write (no reserve, no ranking): the snapshot cases below reason about its state
LIVE = dict(window=16, slots=8, read_top_k=2, threshold=0.5, recent=0, sink=0, **CONSOLIDATING)
READ = {k: v for k, v in LIVE.items() if k not in CONSOLIDATING}  # LIVE's settings without its write
FED = 40


# ---------------------------------------------------------------------------- expectations
@dataclass(frozen=True)
class Refused:
    """The call raises `error` (or a subclass) from camelot's code; the message contains `needle`."""

    error: type[BaseException]
    needle: str


@dataclass(frozen=True)
class CliRefused:
    """`camelot.cli.main` returns `rc` (2: user error, 3: out of memory) and prints one line to
    stderr containing `needle`."""

    needle: str
    rc: int = 2


@dataclass(frozen=True)
class Returns:
    """The call returns; `check(ctx, result)` gives None when the result is the documented one,
    else what is wrong; `describe(ctx, result)` says what came back, for the table."""

    check: Callable[[Any, Any], str | None]
    describe: Callable[[Any, Any], str]


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Ctx], Any]
    expect: Refused | CliRefused | Returns
    setup: Callable[[Ctx], None] | None = None
    watch: Callable[[Ctx], Any] | None = None  # state that must be the same before and after
    xfail: str | None = None  # known bug elsewhere: what is wrong and the fix
    needs_cuda: bool = False  # run only where a CUDA device exists


@dataclass
class CliOutcome:
    rc: int
    stderr: str


# ---------------------------------------------------------------------------- context
class Workspace:
    """What cases share: a temporary folder and a tiny model saved with a char tokenizer (for
    `--model PATH` in CLI cases), built once on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._model_dir: Path | None = None

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from tokenizers import Regex, Tokenizer, models, pre_tokenizers
            from transformers import PreTrainedTokenizerFast

            vocab = {"<unk>": 0, "<s>": 1}
            for c in [chr(i) for i in range(32, 127)] + ["\n"]:
                vocab[c] = len(vocab)
            tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
            tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
            path = self.root / "tiny_model"
            PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>").save_pretrained(path)
            tiny_llama(vocab=len(vocab)).save_pretrained(path)
            self._model_dir = path
        return self._model_dir


class Ctx:
    """One case's world: a fresh folder, and a fresh live wrapper on first use."""

    def __init__(self, ws: Workspace, name: str) -> None:
        self.ws = ws
        self.tmp = ws.root / name
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._cm = None
        self.extra: dict[str, Any] = {}

    @property
    def cm(self) -> camelot.CamelotModel:
        if self._cm is None:
            self._cm = camelot.wrap(tiny_llama(), CamelotConfig(**LIVE))
            self._cm.feed(doc(FED), progress=False)
        return self._cm

    def cli(self, *argv: str) -> CliOutcome:
        from camelot.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(list(argv))
            except SystemExit as e:  # argparse's own usage errors
                rc = int(e.code or 0)
        return CliOutcome(rc, err.getvalue().strip())

    def ppl(self, data: Path | str, *extra: str) -> CliOutcome:
        return self.cli("ppl", "--model", str(self.ws.model_dir), "--data", str(data), "--no-progress",
                        "--device", "cpu", "--out", str(self.tmp / "out"), *extra)

    def file(self, name: str, content: bytes | str) -> Path:
        p = self.tmp / name
        p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return p


def doc(n: int, seed: int = 0, vocab: int = 101, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- state watchers
def memory_state(cm) -> dict[str, Any]:
    """Every tensor and flag of camelot's state, cloned: memory banks, prefixes, open segment."""
    out: dict[str, Any] = {}
    for rt in cm.runtimes:
        for part_name, part in (("memory", rt.state.memory), ("prefix", rt.state.prefix), ("sink", rt.state.sink)):
            if part is None:
                continue
            for n in ("keys", "values", "counts", "ages", "valid", "finite", "telemetry", "size", "empty"):
                v = getattr(part, n, None)
                out[f"{rt.layer_idx}.{part_name}.{n}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
        for n in ("local_k", "local_v"):
            v = getattr(rt.state, n)
            out[f"{rt.layer_idx}.{n}"] = None if v is None else v.detach().clone()
    return out


def same_state(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def model_state(model) -> tuple[Any, bool]:
    """What wrapping changes on a model: its attention implementation and the wrapper mark."""
    return model.config._attn_implementation, hasattr(model, "_camelot_wrapper")


def WATCH_MEMORY(ctx: Ctx) -> dict[str, Any]:  # noqa: N802 (a constant-like watcher)
    return memory_state(ctx.cm)


# ---------------------------------------------------------------------------- helpers of cases
def _save_other(ctx: Ctx, name: str, seed: int = 0, **cfg: Any) -> Path:
    """A snapshot written by another wrapper (tiny llama of `seed`, live settings + cfg)."""
    other = camelot.wrap(tiny_llama(seed=seed), CamelotConfig(**{**LIVE, **cfg}))
    other.feed(doc(FED, seed=5), progress=False)
    path = other.memory.save(ctx.tmp / name)
    other.unwrap()
    return path


class _Evil:
    """Unpickling this creates a marker file: proof that a pickle was (not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_setup(kind: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        marker = ctx.tmp / "pickle_was_executed"
        ctx.extra["marker"] = marker
        path = ctx.tmp / f"evil.{kind}"
        if kind == "pt":
            torch.save({"layer0.keys": _Evil(marker)}, path)  # torch's zip+pickle format
        else:
            path.write_bytes(pickle.dumps({"keys": _Evil(marker)}))
        ctx.extra["path"] = path
    return setup


def _watch_memory_and_marker(ctx: Ctx) -> tuple[dict[str, Any], bool]:
    return memory_state(ctx.cm), ctx.extra["marker"].exists()


def _truncate_setup(ctx: Ctx) -> None:
    path = _save_other(ctx, "mem.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    ctx.extra["path"] = path


def _other_model_setup(ctx: Ctx) -> None:
    ctx.extra["path"] = _save_other(ctx, "other.safetensors", seed=1)


def _other_slots_setup(ctx: Ctx) -> None:
    ctx.extra["path"] = _save_other(ctx, "slots4.safetensors", slots=4)


def _other_write_setup(ctx: Ctx) -> None:
    """The same slot count, half of it a raw reserve (CamelotConfig.recall's write)."""
    slots = CamelotConfig(**LIVE).slots
    ctx.extra["path"] = _save_other(ctx, "reserve.safetensors", span_reserve=slots // 2, importance="surprise",
                                    span_score="scan")


def _question_wrapper(ctx: Ctx):
    """A wrapper whose reserve ranks by a question (CamelotConfig.recall('question')), none set yet."""
    if "qcm" not in ctx.extra:
        ctx.extra["qcm"] = camelot.wrap(tiny_llama(seed=1), CamelotConfig.recall("question", **READ))
    return ctx.extra["qcm"]


def _bert(ctx: Ctx):
    from transformers import BertConfig, BertForMaskedLM

    if "bert" not in ctx.extra:
        ctx.extra["bert"] = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64))
    return ctx.extra["bert"]


def _short_model(ctx: Ctx):
    if "short" not in ctx.extra:
        ctx.extra["short"] = tiny_llama(max_pos=64)
    return ctx.extra["short"]


def _move_model_to_meta(ctx: Ctx) -> None:
    ctx.cm.model.to("meta")  # stands in for .to("cuda") on a CPU-only machine


# -- more snapshots and models
def _other_arch_setup(ctx: Ctx) -> None:
    """A snapshot of a 3-layer llama (the live one has 2)."""
    other = camelot.wrap(tiny_llama(layers=3), CamelotConfig(**LIVE))
    other.feed(doc(FED, seed=5), progress=False)
    ctx.extra["path"] = other.memory.save(ctx.tmp / "three_layers.safetensors")


def _random_bytes_setup(ctx: Ctx) -> None:
    g = torch.Generator().manual_seed(0)
    ctx.extra["path"] = ctx.file("noise.safetensors", bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))


def _rewrap(ctx: Ctx):
    """Unwrap the live wrapper, wrap the same model with another config, score: must equal a
    wrapper built fresh on an identical model."""
    model = ctx.cm.unwrap()
    cfg = CamelotConfig(window=8, slots=4, read_top_k=1, threshold=0.3)
    again = camelot.wrap(model, cfg).score(doc(40, seed=6))
    fresh = camelot.wrap(tiny_llama(), cfg).score(doc(40, seed=6))
    return again, fresh


def _rewrap_check(ctx: Ctx, r) -> str | None:
    again, fresh = r
    return None if torch.equal(again.token_nll, fresh.token_nll) else "rewrapped model scores differ from a fresh one"


def _huge_slots(ctx: Ctx):
    if "huge" not in ctx.extra:
        ctx.extra["huge"] = camelot.wrap(tiny_llama(), CamelotConfig(window=16, slots=10**12, read_top_k=2, recent=0))
    return ctx.extra["huge"]


def _banks_allocated(ctx: Ctx) -> list[bool]:
    return [rt.state.memory.allocated for rt in _huge_slots(ctx).runtimes]


def _to_cuda_after_feed(ctx: Ctx) -> None:
    ctx.cm.model.to("cuda")


# -- short document: the result must equal a plain forward (nothing in memory yet)
def _short_doc(ctx: Ctx):
    ids = doc(10, seed=3)
    out = ctx.cm.score(ids)
    telemetry = ctx.cm.memory.telemetry()  # before unwrap: the unwrapped wrapper refuses every call
    with torch.no_grad():
        ctx.cm.unwrap()
        ref = torch.nn.functional.cross_entropy(ctx.cm.model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    return out, ref, telemetry


def _short_doc_check(ctx: Ctx, r) -> str | None:
    out, ref, telemetry = r
    if out.token_nll.shape != (1, 9):
        return f"shape {tuple(out.token_nll.shape)}"
    if not torch.allclose(out.token_nll[0], ref, atol=1e-5):
        return "losses differ from a plain forward"
    if any(v for v in telemetry.values()):
        return "memory was written before a segment closed"
    return None


def _one_token_check(ctx: Ctx, out) -> str | None:
    if out.token_nll.shape != (1, 0) or not math.isnan(out.perplexity) or ctx.cm.open_len != 1:
        return f"got shape {tuple(out.token_nll.shape)}, ppl {out.perplexity}, open {ctx.cm.open_len}"
    return None


# -- NaN / inf injected into the hidden states of layer 0 during the second segment
POISON_POS = 3  # position inside segment 2 (absolute 16 + 3 = 19)


def _wrapper(ctx: Ctx, strategy: str):
    """The live wrapper (camelot) or one like it with another strategy, built on first use."""
    if strategy == "camelot":
        return ctx.cm
    if strategy not in ctx.extra:
        ctx.extra[strategy] = camelot.wrap(tiny_llama(), CamelotConfig(**LIVE, strategy=strategy))
    return ctx.extra[strategy]


def _poison(value: float, strategy: str = "camelot") -> Callable[[Ctx], Any]:
    def run(ctx: Ctx):
        cm = _wrapper(ctx, strategy)
        ctx.extra["poisoned"] = cm
        calls = {"n": 0}

        def hook(module, args, output):
            calls["n"] += 1
            if calls["n"] != 2:  # score: one forward per segment; poison segment 2 only
                return None
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[:, POISON_POS] = value
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = cm.model.model.layers[0].register_forward_hook(hook)
        try:
            out = cm.score(doc(80, seed=4))
        finally:
            handle.remove()
        return out
    return run


def _skipped(cm) -> int:
    """Non-finite tokens kept out: memory telemetry, or the raw windows' null-token count."""
    if any(rt.state.memory is not None for rt in cm.runtimes):
        return cm.memory.telemetry()["skipped"]
    return sum(int(rt.state.prefix.skipped) for rt in cm.runtimes
               if rt.state.prefix is not None and rt.state.prefix.skipped is not None)


def _poison_check(ctx: Ctx, out) -> str | None:
    cm = ctx.extra["poisoned"]
    for rt in cm.runtimes:
        for part, name in ((rt.state.memory, "memory"), (rt.state.prefix, "prefix")):
            st = {} if part is None else (part.state_dict() if hasattr(part, "state_dict") else
                                          {"keys": part.keys, "values": part.values})
            if st and not (torch.isfinite(st["keys"]).all() and torch.isfinite(st["values"]).all()):
                return f"layer {rt.layer_idx} {name} absorbed non-finite values"
    skipped = _skipped(cm)
    if skipped != 2:  # the poisoned token x 2 KV heads, at layer 1 (layer 0 saw clean input)
        return f"skipped={skipped}, expected 2"
    nll = out.token_nll[0]
    # Segment 2 (predictions 16..31) may be lost: its tokens share one attention matmul, where a
    # masked NaN value still gives 0 * NaN = NaN. Everything before and after must be finite.
    if not torch.isfinite(nll[:16]).all() or not torch.isfinite(nll[32:]).all():
        return "losses outside the poisoned segment are not finite"
    if torch.isfinite(nll[16 + POISON_POS]):
        return "the poisoned position does not show as a NaN loss"
    return None


def _poison_describe(ctx: Ctx, out) -> str:
    cm = ctx.extra["poisoned"]
    nll = out.token_nll[0]
    nan = (~torch.isfinite(nll)).nonzero()[:, 0].tolist()
    where = "telemetry skipped" if any(rt.state.memory is not None for rt in cm.runtimes) else \
        "prefix.skipped (kept as null tokens)"
    return (f"returned; {where}={_skipped(cm)} (the token x 2 KV heads at layer 1); state finite; NaN losses only "
            f"at predictions {nan[0]}..{nan[-1]} (the poisoned segment: a masked NaN value still meets a 0 weight "
            f"in its matmul); all {int(torch.isfinite(nll[32:]).sum())} later losses finite")


# ---------------------------------------------------------------------------- the cases
CASES: list[Case] = [
    # -- documents
    Case("empty document (API: cm.score([]))", lambda c: c.cm.score([]),
         Refused(ValueError, "empty input"), watch=WATCH_MEMORY),
    Case("empty document (CLI: camelot ppl --data empty.txt)", lambda c: c.ppl(c.file("empty.txt", "")),
         CliRefused("is empty")),
    Case("whitespace-only document (CLI)", lambda c: c.ppl(c.file("blank.txt", " \n\t\n")),
         CliRefused("is empty")),
    Case("document shorter than one segment (10 tokens, window 16)", _short_doc,
         Returns(_short_doc_check, lambda c, r: "9 losses, equal to a plain forward of the model (nothing was "
                 "in memory); the 10 tokens stay in the open window, memory unwritten")),
    Case("exactly one token (API: cm.score([5]))", lambda c: c.cm.score([5]),
         Returns(_one_token_check, lambda c, r: "ScoreOutput with 0 predictions (token_nll shape (1, 0)), "
                 "perplexity nan; the token sits in the open window")),
    Case("exactly one token (CLI)", lambda c: c.ppl(c.file("one.txt", "a")), CliRefused("at least 2")),
    Case("binary file (CLI)", lambda c: c.ppl(c.file("model.bin.txt", b"\x7fELF\x02\x01\x00\x00\xff\xfe")),
         CliRefused("binary")),
    Case("non-UTF-8 file (CLI, latin-1 text)",
         lambda c: c.ppl(c.file("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))),
         CliRefused("not UTF-8")),
    Case("directory with no text files (CLI)",
         lambda c: (c.file("data.bin", b"\x00\x01"), c.ppl(c.tmp))[1], CliRefused("no .txt files")),
    Case("data path that does not exist (CLI)", lambda c: c.ppl(c.tmp / "nope.txt"), CliRefused("data not found")),
    # -- token ids
    Case("token ids outside the vocabulary", lambda c: c.cm.score([[5, 500]], keep_memory=True),
         Refused(ValueError, "must lie in"), watch=WATCH_MEMORY),
    Case("float token ids", lambda c: c.cm.score(torch.ones(1, 4), keep_memory=True),
         Refused(TypeError, "integers"), watch=WATCH_MEMORY),
    Case("batch size changed while memory is kept", lambda c: c.cm.score(doc(8, batch=2), keep_memory=True),
         Refused(ValueError, "reset"), watch=WATCH_MEMORY),
    Case("cm.step with more tokens than the open segment has room for", lambda c: c.cm.step(doc(12)),
         Refused(ValueError, "room"), watch=WATCH_MEMORY),
    Case("token ids as a list of floats ([1.5, 2.0])", lambda c: c.cm.score([1.5, 2.0], keep_memory=True),
         Refused(TypeError, "integers"), watch=WATCH_MEMORY),
    Case("ragged list of token ids ([[1, 2], [3]])", lambda c: c.cm.score([[1, 2], [3]], keep_memory=True),
         Refused(ValueError, "sequence"), watch=WATCH_MEMORY),
    Case("generate with max_new_tokens < 0", lambda c: c.cm.generate(doc(4), max_new_tokens=-1),
         Refused(ValueError, "max_new_tokens"), watch=WATCH_MEMORY),
    # -- configuration
    Case("window larger than the model's position range (wrap)",
         lambda c: camelot.wrap(_short_model(c), CamelotConfig(window=128)),
         Refused(ValueError, "position range"), watch=lambda c: model_state(_short_model(c))),
    Case("window larger than the model's position range (CLI --window 4096)",
         lambda c: c.ppl(c.file("doc.txt", "hello world, " * 20), "--window", "4096", "--strategies", "window"),
         CliRefused("exceeds the model's 1024 positions")),
    Case("slots = 0", lambda c: CamelotConfig(slots=0), Refused(ValueError, "slots must be an integer >= 1")),
    Case("slots negative (-5)", lambda c: CamelotConfig(slots=-5),
         Refused(ValueError, "slots must be an integer >= 1")),
    Case("slots = 0 (CLI --slots 0)", lambda c: c.ppl(c.file("doc.txt", "hello"), "--slots", "0"),
         CliRefused("slots must be an integer >= 1")),
    Case("threshold > 1 (1.5)", lambda c: CamelotConfig(threshold=1.5),
         Refused(ValueError, "threshold must be in [-1, 1]")),
    Case("threshold < -1 (-1.5)", lambda c: CamelotConfig(threshold=-1.5),
         Refused(ValueError, "threshold must be in [-1, 1]")),
    Case("threshold NaN", lambda c: CamelotConfig(threshold=float("nan")),
         Refused(ValueError, "threshold must be in [-1, 1]")),
    Case("top_k > slots (top_k 8, slots 4)", lambda c: CamelotConfig(slots=4, read_top_k=8),
         Refused(ValueError, "must not exceed slots")),
    Case("top_k > slots (CLI --slots 4 --read-top-k 8)",
         lambda c: c.ppl(c.file("doc.txt", "hello"), "--slots", "4", "--read-top-k", "8"),
         CliRefused("must not exceed")),
    Case("threshold outside [-1, 1] (CLI --threshold 2)",
         lambda c: c.ppl(c.file("doc.txt", "hello"), "--threshold", "2"), CliRefused("threshold must be in [-1, 1]")),
    Case("count_bias given as a string ('yes')", lambda c: CamelotConfig(count_bias="yes"),
         Refused(ValueError, "count_bias must be a number in [0, 4]")),
    Case("slots far beyond memory (10**12: first segment write)", lambda c: _huge_slots(c).score(doc(40)),
         Refused(MemoryError, "lower slots"), watch=_banks_allocated),
    Case("slots far beyond memory (CLI --slots 1000000000000)",
         lambda c: c.ppl(c.file("doc.txt", "hello world, " * 5), "--slots", "1000000000000", "--window", "16",
                         "--recent", "0", "--strategies", "camelot"),
         CliRefused("lower slots", rc=3)),
    Case("soak with --tokens 0 (CLI)", lambda c: c.cli("soak", "--tokens", "0", "--model", str(c.ws.model_dir)),
         CliRefused("must be >= 1")),
    # -- faults inside the model
    Case("NaN in hidden states (forward hook on layer 0, one token of segment 2)", _poison(float("nan")),
         Returns(_poison_check, _poison_describe)),
    Case("inf in hidden states (same hook, +inf)", _poison(float("inf")), Returns(_poison_check, _poison_describe)),
    Case("NaN in hidden states, knn strategy (token store)", _poison(float("nan"), "knn"),
         Returns(_poison_check, _poison_describe)),
    Case("NaN in hidden states, recurrent strategy (raw previous segment)", _poison(float("nan"), "recurrent"),
         Returns(_poison_check, _poison_describe)),
    Case("NaN in hidden states, sliding strategy (raw last `slots` tokens)", _poison(float("nan"), "sliding"),
         Returns(_poison_check, _poison_describe)),
    # -- models
    Case("model type with no adapter (bert)", lambda c: camelot.wrap(_bert(c)),
         Refused(ValueError, "has no camelot adapter"), watch=lambda c: model_state(_bert(c))),
    Case("wrapping an already wrapped model", lambda c: camelot.wrap(c.cm.model),
         Refused(ValueError, "already wrapped"), watch=lambda c: (memory_state(c.cm), model_state(c.cm.model))),
    Case("wrapping the wrapper itself (camelot.wrap(cm))", lambda c: camelot.wrap(c.cm),
         Refused(ValueError, "camelot wraps HF causal LMs"), watch=lambda c: memory_state(c.cm)),
    Case("unwrap, then wrap the same model again with another config", _rewrap,
         Returns(_rewrap_check, lambda c, r: "works; losses equal bit for bit those of a fresh wrapper on an "
                 "identical model (unwrap leaves nothing behind)")),
    Case("token ids on the meta device", lambda c: c.cm.score(torch.zeros(1, 4, dtype=torch.long, device="meta"),
                                                              keep_memory=True),
         Refused(ValueError, "meta device"), watch=WATCH_MEMORY),
    Case("score on a model moved to another device than its memory (model.to('meta') stands in for cuda)",
         lambda c: c.cm.score(doc(8), keep_memory=True), Refused(ValueError, "camelot memory is on cpu"),
         setup=_move_model_to_meta, watch=WATCH_MEMORY),
    Case("score on a model moved to cuda after its memory was written on cpu",
         lambda c: c.cm.score(doc(8), keep_memory=True), Refused(ValueError, "camelot memory is on cpu"),
         setup=_to_cuda_after_feed, watch=WATCH_MEMORY, needs_cuda=True),
    Case("reading a document into a question-ranked reserve before set_question()",
         lambda c: _question_wrapper(c).feed(doc(FED), progress=False), Refused(ValueError, "set_question"),
         watch=lambda c: memory_state(_question_wrapper(c))),
    Case("set_question() on a memory that does not rank by a question", lambda c: c.cm.set_question(doc(5)),
         Refused(ValueError, "recall('question')"), watch=WATCH_MEMORY),
    # -- snapshots
    Case("snapshot from another model (same architecture, other weights)",
         lambda c: c.cm.memory.load(c.extra["path"]), Refused(SnapshotError, "another"),
         setup=_other_model_setup, watch=WATCH_MEMORY),
    Case("snapshot from another architecture (3-layer llama into a 2-layer one)",
         lambda c: c.cm.memory.load(c.extra["path"]), Refused(SnapshotError, "another model"),
         setup=_other_arch_setup, watch=WATCH_MEMORY),
    Case("snapshot file of random bytes", lambda c: c.cm.memory.load(c.extra["path"]),
         Refused(SnapshotError, "snapshot"), setup=_random_bytes_setup, watch=WATCH_MEMORY),
    Case("snapshot with another slot count", lambda c: c.cm.memory.load(c.extra["path"]),
         Refused(SnapshotError, "slots"), setup=_other_slots_setup, watch=WATCH_MEMORY),
    Case("snapshot with another write (a raw reserve in the same slots: --recall)",
         lambda c: c.cm.memory.load(c.extra["path"]), Refused(SnapshotError, "span_reserve"),
         setup=_other_write_setup, watch=WATCH_MEMORY),
    Case("truncated snapshot (first 60% of the file)", lambda c: c.cm.memory.load(c.extra["path"]),
         Refused(SnapshotError, "not a readable camelot snapshot"),
         setup=_truncate_setup, watch=WATCH_MEMORY),
    Case("snapshot that is a pickle (plain pickle with a code-running __reduce__)",
         lambda c: c.cm.memory.load(c.extra["path"]), Refused(SnapshotError, "snapshot"),
         setup=_pickle_setup("pkl"), watch=_watch_memory_and_marker),
    Case("snapshot that is a torch.save file (zip + pickle with a code-running __reduce__)",
         lambda c: c.cm.memory.load(c.extra["path"]), Refused(SnapshotError, "snapshot"),
         setup=_pickle_setup("pt"), watch=_watch_memory_and_marker),
    Case("snapshot path that does not exist", lambda c: c.cm.memory.load(c.tmp / "missing.safetensors"),
         Refused(SnapshotError, "no such snapshot"), watch=WATCH_MEMORY),
]


# ---------------------------------------------------------------------------- running a case
@dataclass
class Observation:
    """What a case did, and how that differs from what it should do (`problems` empty = pass)."""

    case: Case
    outcome: str  # raised | returned | exit
    error_type: str | None = None
    message: str = ""
    raised_in: str | None = None  # repo-relative file:line of the innermost frame
    state_kept: bool | None = None
    exc: BaseException | None = None
    problems: list[str] = field(default_factory=list)


def _innermost(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return "?"
    f = Path(tb[-1].filename)
    try:
        return f"{f.resolve().relative_to(REPO)}:{tb[-1].lineno}"
    except ValueError:
        return f"{f}:{tb[-1].lineno}"


def observe(case: Case, ws: Workspace) -> Observation:
    """Run one case in a fresh context and check it against its expectation."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in case.name)[:60]
    ctx = Ctx(ws, slug)
    if case.setup is not None:
        case.setup(ctx)
    before = case.watch(ctx) if case.watch else None
    obs = Observation(case, "returned")
    result = None
    try:
        result = case.run(ctx)
    except Exception as e:  # the point of the table: catch and describe
        obs.outcome = "raised"
        obs.exc = e
        obs.error_type = type(e).__name__
        obs.message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        obs.raised_in = _innermost(e)
    if case.watch is not None:
        obs.state_kept = same_state(before, case.watch(ctx))
        if not obs.state_kept:
            obs.problems.append("state changed by the call")
    exp = case.expect
    if isinstance(exp, Refused):
        if obs.outcome != "raised":
            obs.problems.append(f"expected {exp.error.__name__}, the call returned")
        else:
            if not isinstance(obs.exc, exp.error):
                obs.problems.append(f"expected {exp.error.__name__}, got {obs.error_type}")
            if exp.needle not in obs.message:
                obs.problems.append(f"message lacks {exp.needle!r}")
            top = obs.raised_in.split("/")[0]
            if top not in ("camelot", "adapters", "eval"):
                obs.problems.append(f"raised deep inside a dependency ({obs.raised_in})")
    elif isinstance(exp, CliRefused):
        if obs.outcome == "raised":
            obs.problems.append(f"the CLI raised {obs.error_type}: {obs.message}")
        else:
            obs.outcome = "exit"
            obs.message = result.stderr
            lines = result.stderr.splitlines()
            if result.rc != exp.rc:
                obs.problems.append(f"exit code {result.rc}, expected {exp.rc}")
            if len(lines) != 1 or "Traceback" in result.stderr:
                obs.problems.append(f"stderr is not one line: {result.stderr!r}")
            if exp.needle not in result.stderr:
                obs.problems.append(f"stderr lacks {exp.needle!r}")
    else:
        if obs.outcome == "raised":
            obs.problems.append(f"raised {obs.error_type}: {obs.message}")
        else:
            why = exp.check(ctx, result)
            if why:
                obs.problems.append(why)
            obs.message = exp.describe(ctx, result)
    return obs


# The hostile-user cases of issue 19 live in their own module (this one is long enough); they
# use the helpers above, so they are imported last.
from tests.reliability_hostile import HOSTILE_CASES  # noqa: E402

CASES += HOSTILE_CASES
