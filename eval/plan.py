"""The plan of a side-by-side evaluation: which runs (strategy x settings) a sweep of memory
settings expands to, and the sweep's command-line flags. Shared by `camelot ppl`, `passkey` and
`retrieval`; every config is validated while planning, before any model loads."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from camelot import options
from camelot.config import STRATEGIES, WRITE_FIELDS, CamelotConfig
from camelot.options import AUTO_SET, UserError, parse_top_k
from camelot.presets import TAIL, slots_for_budget

RECALL = "camelot-recall"  # camelot with CamelotConfig.recall's write (a surprise-ranked raw reserve)
QUESTION = "camelot-question"  # CamelotConfig.recall("question"): the question is given before the document
QUESTION_FACTS = "camelot-question-facts"  # recall("question+facts"): half the reserve each, question and surprise
BALANCED = "camelot-balanced"  # recall("balanced"), the default write: what `camelot` runs
CONSOLIDATING = "camelot-consolidating"  # CamelotConfig.consolidating(): the default write until 2026-12-06
# the camelot strategies of a preset write, by the preset's kind (options.recall_config)
RECALL_STRATEGIES = {RECALL: "facts", QUESTION: "question", QUESTION_FACTS: "question+facts", BALANCED: "balanced",
                     CONSOLIDATING: "consolidating"}
ASKED = (QUESTION, QUESTION_FACTS)  # strategies that read each case's question before its document
ALL_STRATEGIES = (*STRATEGIES, *RECALL_STRATEGIES, "full")
DEFAULT_STRATEGIES = ("window", "recurrent", "sliding", "knn", "camelot", "full")


# ---------------------------------------------------------------------------- the plan
@dataclass
class Sweep:
    """Every value to try for each setting; `plan_runs` turns it into runs."""

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    windows: tuple[int, ...] = (128,)
    slots: tuple[int, ...] = (CamelotConfig.slots,)
    thresholds: tuple[float, ...] = (CamelotConfig.threshold,)
    top_ks: tuple[int | None, ...] = (CamelotConfig.read_top_k,)
    knn_top_ks: tuple[int | None, ...] = (32,)  # knn reads k of every stored token (Memorizing Transformer)
    count_biases: tuple[float, ...] = (CamelotConfig.count_bias,)
    count_modes: tuple[str, ...] = (CamelotConfig.count_mode,)
    count_caps: tuple[float | None, ...] = (CamelotConfig.count_cap,)
    memory_distances: tuple[int | None, ...] = (None,)
    placements: tuple[str, ...] = (CamelotConfig.placement,)
    retrieves: tuple[str | None, ...] = (None,)  # None: not given (read_top_k="auto" may choose)
    layers: tuple[list[int] | None, ...] = (None,)
    recents: tuple[int, ...] = (CamelotConfig.recent,)
    sinks: tuple[int, ...] = (CamelotConfig.sink,)
    block_sizes: tuple[int, ...] = (CamelotConfig.block_size,)  # infllm
    repr_topks: tuple[int, ...] = (CamelotConfig.repr_topk,)
    search: str | None = None  # None: not given (read_top_k="auto" may choose)
    write_mode: str = CamelotConfig.write_mode
    rules: dict[str, tuple] = field(default_factory=dict)  # WRITE_FIELDS -> values (camelot)
    # KV entries per head besides the segment; where given, each camelot and infllm run's slots are
    # what its sinks and its own raw tail leave (slots_for_budget), and `slots` is not used
    budgets: tuple[int, ...] = ()


@dataclass
class RunSpec:
    """One row of the results: a strategy with its settings (`config` is None for `full`)."""

    strategy: str
    window: int | None
    params: dict[str, Any]
    config: CamelotConfig | None

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={fmt_param(v, k)}" for k, v in self.params.items())
        return f"{self.strategy} {shown}".strip()


@dataclass
class RunResult:
    """Token-weighted totals of one run over all documents, with per-position buckets."""

    spec: RunSpec
    nll_sum: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    bucket_nll: list[float] = field(default_factory=list)
    bucket_tokens: list[int] = field(default_factory=list)
    docs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def bucket_ppl(self) -> list[float | None]:
        return [math.exp(s / n) if n else None for s, n in zip(self.bucket_nll, self.bucket_tokens)]


def plan_runs(sweep: Sweep, questions: bool = False) -> list[RunSpec]:
    """Runs for a sweep: memory settings multiply only where a strategy uses them, so baselines
    run once per window. Every config is validated here, before any model is loaded.
    questions: the cases have questions that may be given before the document (retrieval)."""
    unknown = [s for s in sweep.strategies if s not in ALL_STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}")
    asked = [s for s in sweep.strategies if s in ASKED]
    if asked and not questions:
        raise UserError(f"{asked[0]} reads each case's question before its document: `camelot retrieval` only")
    specs: list[RunSpec] = []
    base = {"search": sweep.search, "write_mode": sweep.write_mode}
    for w in sweep.windows:
        runs = {s: [_spec(s, w, p, base, sweep) for p in _grid(s, sweep)]
                for s in sweep.strategies if s not in ("full", "sliding", "infllm")}
        if "sliding" in sweep.strategies or "infllm" in sweep.strategies:
            # the baselines hold what each camelot run holds besides the sinks: its slots plus its tail
            held = [r for s, rs in runs.items() if s == "camelot" or s in RECALL_STRATEGIES for r in rs] \
                or [_spec("camelot", w, p, base, sweep) for p in _grid("camelot", sweep)]
            sizes = tuple(sorted({r.config.slots + r.config.recent for r in held}))
            if "sliding" in sweep.strategies:
                runs["sliding"] = [_spec("sliding", w, p, base, sweep) for p in _product(slots=sizes, sink=sweep.sinks)]
            if "infllm" in sweep.strategies:
                runs["infllm"] = [_spec("infllm", w, p, base, sweep) for p in _grid("infllm", sweep, sizes)]
        specs.extend(r for s in sweep.strategies if s in runs for r in runs[s])
    if "full" in sweep.strategies:
        specs.append(RunSpec("full", None, {}, None))
    return specs


def _grid(strategy: str, sweep: Sweep, held: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """The settings a strategy runs with: the sweep's values of those it uses. held: what camelot's
    runs hold besides the sinks (slots + raw tail), which infllm's local window and blocks share."""
    if strategy == "window":
        return [{}]
    if strategy == "recurrent":
        return _product(sink=sweep.sinks)
    if strategy == "infllm":  # attends sinks + local window + read blocks: camelot's entries, in whole blocks
        grid = _product(held=held, recent=sweep.recents, sink=sweep.sinks, block_size=sweep.block_sizes,
                        repr_topk=sweep.repr_topks, memory_distance=sweep.memory_distances, layers=sweep.layers)
        out = []
        for p in grid:  # to the nearest whole number of blocks (at least one): within half a block of camelot
            slots = p.pop("held") - (TAIL if p["recent"] == "auto" else p["recent"])
            out.append({"slots": max(1, round(slots / p["block_size"])) * p["block_size"], **p})
        return [dict(t) for t in dict.fromkeys(tuple(p.items()) for p in out)]
    if strategy == "knn":
        return _product(read_top_k=sweep.knn_top_ks, recent=sweep.recents, sink=sweep.sinks,
                        memory_distance=sweep.memory_distances, placement=sweep.placements,
                        retrieve=sweep.retrieves, layers=sweep.layers)
    # camelot and the recall strategies
    size = {"budget": sweep.budgets} if sweep.budgets else {"slots": sweep.slots}
    return _product(**size, recent=sweep.recents, sink=sweep.sinks, threshold=sweep.thresholds,
                    read_top_k=sweep.top_ks, count_bias=sweep.count_biases, count_mode=sweep.count_modes,
                    count_cap=sweep.count_caps, memory_distance=sweep.memory_distances, placement=sweep.placements,
                    retrieve=sweep.retrieves, layers=sweep.layers, **sweep.rules)


def _spec(strategy: str, window: int, params: dict[str, Any], base: dict[str, Any], sweep: Sweep) -> RunSpec:
    try:
        if "budget" in params:
            params = _split_budget(strategy, window, params, base)
        given = {k: v for k, v in {**base, **params}.items() if not (k in AUTO_SET and v is None)}
        cfg = _config(strategy, window, given)
    except ValueError as e:
        raise UserError(f"{strategy} with window={window} {params}: {e}") from None
    # the table names what ran where a value was "auto" (the read; camelot's tail and reserve)
    params = {k: getattr(cfg, k) if v == "auto" else v for k, v in params.items()
              if not (k == "span_reserve" and v == "auto")}  # the reserve follows slots: not named
    return RunSpec(strategy, window, _shown(params, sweep), cfg)


def _split_budget(strategy: str, window: int, params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A camelot run's params with `budget` turned into the slots its sinks and its write's own raw
    tail leave (the default write's tail grows with the slots: window + tail = sinks + slots)."""
    p = dict(params)
    budget = p.pop("budget")
    given = {k: v for k, v in {**base, **p}.items() if not (k in AUTO_SET and v is None)}
    probe = _config(strategy, window, {**given, "slots": max(1, budget), "read_top_k": None, "search": "torch"})
    slots = slots_for_budget(budget, probe.sink, p.get("recent", "auto"), probe.evict, window)
    if slots < 1:
        given = p.get("recent", "auto") != "auto"  # an auto tail has no room either: it follows the slots
        raise ValueError(f"budget {budget} leaves no slots beside {probe.sink} sinks"
                         + (f" and a raw tail of {probe.recent}" if given else ""))
    return {"slots": slots, **p}


def _config(strategy: str, window: int, given: dict[str, Any]) -> CamelotConfig:
    if strategy not in RECALL_STRATEGIES:
        return CamelotConfig(window=window, strategy=strategy, **given)
    return options.recall_config(RECALL_STRATEGIES[strategy], window=window, strategy="camelot", **given)


def _product(**axes: tuple) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _shown(params: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
    """The params a table row names: always slots/threshold/top_k/count_bias where they apply;
    memory_distance and layers only when set or swept (they are rarely changed)."""
    out = {}
    for k, v in params.items():
        if k == "memory_distance" and len(sweep.memory_distances) == 1 and v is None:
            continue
        if k == "layers" and len(sweep.layers) == 1 and v is None:
            continue
        if k == "placement" and len(sweep.placements) == 1:
            continue
        if k == "retrieve" and len(sweep.retrieves) == 1:
            continue
        if k == "count_mode" and len(sweep.count_modes) == 1 and v == CamelotConfig.count_mode:
            continue
        if k == "count_cap" and len(sweep.count_caps) == 1 and v == CamelotConfig.count_cap:
            continue
        if k in ("block_size", "repr_topk") and len(getattr(sweep, k + "s")) == 1:
            continue
        if k in ("recent", "sink") and v == 0 and len(getattr(sweep, k + "s")) == 1:
            continue
        if k in WRITE_FIELDS and len(sweep.rules.get(k, ())) <= 1 and v == getattr(CamelotConfig, k):
            continue  # the write rule's settings only where they differ from the default
        out[k] = v
    return out


def fmt_param(v: Any, key: str = "") -> str:
    if isinstance(v, bool) or (key == "count_bias" and v in (0, 1)):
        return "on" if v else "off"
    if v is None:
        return "all" if key == "read_top_k" else "default"
    if isinstance(v, list):
        return format_layers(v)
    return str(v)


# ---------------------------------------------------------------------------- the sweep flags
def parse_list(text: str, kind: type, name: str) -> tuple:
    """"128,256" -> (128, 256) with a clear error naming the option."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"--{name} needs at least one value")
    out = []
    for t in items:
        try:
            out.append(kind(t))
        except (ValueError, argparse.ArgumentTypeError):
            raise UserError(f"--{name}: {t!r} is not a valid {kind.__name__}") from None
    return tuple(out)


def format_layers(layers: list[int]) -> str:
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ",".join(runs)


def parse_layers(text: str) -> tuple[list[int] | str | None, ...]:
    """"default/all/0-14/15,20-29" -> (None, "all", [0..14], [15, 20..29]): '/' separates sweep
    values; default is the adapter's choice (gemma2/3: the full-attention layers)."""
    out = []
    for chunk in text.split("/"):
        try:
            out.append(options.parse_layers(chunk))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--layers: {e}") from None
    return tuple(out)


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    v = lambda name: options.sweep_values(args, name)  # noqa: E731
    return Sweep(
        strategies=parse_list(args.strategies, str, "strategies"),
        windows=v("window"), slots=v("slots"), thresholds=v("threshold"), top_ks=v("read_top_k"),
        knn_top_ks=parse_list(args.knn_top_k, parse_top_k, "knn-top-k"),
        recents=v("recent"), sinks=v("sink"), count_biases=v("count_bias"), count_modes=v("count_mode"),
        count_caps=v("count_cap"),
        memory_distances=v("memory_distance"), placements=v("placement"), retrieves=v("retrieve"),
        layers=parse_layers(args.layers), search=args.search, write_mode=args.write_mode,
        block_sizes=v("block_size"), repr_topks=v("repr_topk"), rules={name: v(name) for name in WRITE_FIELDS},
    )


def add_sweep_args(p: argparse.ArgumentParser, **defaults: str) -> None:
    """The memory settings a run sweeps (comma-separated values), built from CamelotConfig's
    fields; `defaults` overrides a default by field name (window="512")."""
    p.add_argument("--strategies", default=defaults.pop("strategies", ",".join(DEFAULT_STRATEGIES)),
                   help=f"from {','.join(ALL_STRATEGIES)} ({RECALL}: camelot with CamelotConfig.recall's write, "
                        "a raw reserve of the most surprising tokens for finding facts again; rule flags "
                        f"moved off their defaults still apply; {QUESTION}, retrieval only: the reserve keeps what "
                        f"each case's question, read before the document, attends to most; {QUESTION_FACTS}: half "
                        f"of it that, half the surprising tokens; {BALANCED}: the default write, what camelot runs; "
                        f"{CONSOLIDATING}: the default until 2026-12-06, every slot consolidated and the oldest "
                        "evicted, a raw tail of 128 unless --recent says)")
    p.add_argument("--knn-top-k", default="32", help="stored tokens read per query by knn ('all': every one)")
    fallback = defaults.pop("budget", None)
    options.add_config_args(p, skip=("strategy", "memory_dtype"), sweep=True, **defaults)
    p.add_argument("--budget", default=None,
                   help="KV entries per head besides the segment, the same for every strategy: sinks + raw tail + "
                   "slots (camelot: each write splits it by its own tail), sinks + raw tokens (sliding), sinks + "
                   "local + whole blocks (infllm); comma-separated to sweep; instead of --slots"
                   + (f"; default {fallback} unless --slots is given" if fallback else ""))


def budget_values(args: argparse.Namespace, slots_default: str, fallback: str | None = None) -> tuple[int, ...]:
    """--budget's values; () where the budget is neither given nor the command's fallback (then
    --slots sizes the runs). Given with --slots moved off its default, it is refused: the two
    size the same bank."""
    slots_given = args.slots != slots_default
    if args.budget is not None and slots_given:
        raise UserError("give --budget or --slots, not both")
    text = args.budget if args.budget is not None else (None if slots_given else fallback)
    if text is None:
        return ()
    budgets = parse_list(text, int, "budget")
    if any(b < 1 for b in budgets):
        raise UserError(f"--budget must be >= 1, got {text}")
    if args.slots == "auto":
        args.slots = str(CamelotConfig.slots)  # not used: the budget sets each run's slots
    return budgets


def sweep_at_budget(args: argparse.Namespace, slots_default: str, fallback: str | None = None) -> Sweep:
    """The sweep of the flags, sized by --budget where one is given (or the fallback applies)."""
    budgets = budget_values(args, slots_default, fallback)
    return dataclasses.replace(sweep_from_args(args), budgets=budgets)
