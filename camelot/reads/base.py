"""What every memory read shares: the result it hands to the attention, the count bias, and
the common start (the memory's tensors and the queries turned to face it).

A read returns one of two results. `DenseResult`: logits for every entry, memory joins the
softmax like a prefix of plain keys (one value matmul). `SparseResult`: logits for each query's
own k entries, written into k spare columns of the plain logits, and their gathered values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from camelot.interfaces import Memory, PositionBias, SearchBackend
from camelot.positions import Positions

COUNT_MODES = ("relative", "absolute")  # what CountBias compares a slot's count with


@dataclass
class ReadAttribution:
    """Which memory entries each query read in the last forward (retrieval attribution)."""

    slots: torch.Tensor  # [B, Hkv, G, m, k]
    weights: torch.Tensor  # [B, Hkv, G, m, k] share of the query's attention mass on each
    every: bool = False  # every entry, in order (slots is an arange): a sum gives each one's mass

    def mass(self, n: int) -> torch.Tensor:
        """[B, Hkv, n]: the attention mass each of n entries received, summed over the queries."""
        b, hkv = self.weights.shape[:2]
        if self.every and self.weights.shape[-1] == n:  # no scatter over G*m*n entries
            return self.weights.float().sum(dim=(2, 3))
        out = self.weights.new_zeros(b, hkv, n, dtype=torch.float32)
        return out.scatter_add_(2, self.slots.reshape(b, hkv, -1), self.weights.reshape(b, hkv, -1).float())


@dataclass
class DenseResult:
    """Memory joins like a prefix: logits [B, Hkv, G, m, S] against values [B, Hkv, S, Dv]; or,
    `deferred` (bias [B*Hkv, 1, S], scaled queries [B*Hkv, G*m, D], keys [B*Hkv, D, S]), the
    logits are made by one baddbmm straight into the columns the plain logits left for them
    (`extra_columns`), not made apart and concatenated (a pass over every logit saved)."""

    logits: torch.Tensor | None
    values: torch.Tensor
    slots: torch.Tensor | None = None  # [B, Hkv, G, m, k] where a top-k masked the rest
    deferred: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    g: int = 1  # query heads per KV head (the deferred queries' rows are G x m)

    spare_columns = 0

    @property
    def extra_columns(self) -> int:
        return 0 if self.deferred is None else self.values.shape[2]

    def materialized(self) -> DenseResult:
        """The logits made (for a caller that changes them: a position bias)."""
        if self.deferred is None:
            return self
        b, hkv, n = self.values.shape[:3]
        s = torch.baddbmm(*self.deferred)
        return DenseResult(s.view(b, hkv, self.g, -1, n), self.values, self.slots)

    def join(self, logits: torch.Tensor, values: list[torch.Tensor], start: int) -> torch.Tensor:
        values.append(self.values)
        if self.deferred is None:
            return torch.cat([logits, self.logits], dim=-1)
        flat = logits.view(-1, logits.shape[2] * logits.shape[3], logits.shape[-1])
        torch.baddbmm(*self.deferred, out=flat[..., start:])
        return logits

    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def add_output(self, out: torch.Tensor, probs: torch.Tensor, start: int) -> torch.Tensor:
        return out  # memory values were in the plain value matmul

    def attribution(self, probs: torch.Tensor, start: int) -> ReadAttribution:
        share = probs[..., start: start + self.values.shape[2]]
        if self.slots is not None:
            return ReadAttribution(self.slots, share.gather(-1, self.slots))
        return ReadAttribution(torch.arange(share.shape[-1], device=share.device).expand_as(share), share, every=True)


@dataclass
class SparseResult:
    """Each query's own k entries: logits [B, Hkv, G, m, k], values [B, Hkv, G, m, k, Dv]."""

    logits: torch.Tensor
    slots: torch.Tensor  # [B, Hkv, G, m, k]
    gathered: torch.Tensor

    @property
    def spare_columns(self) -> int:
        return self.logits.shape[-1]

    def join(self, logits: torch.Tensor, values: list[torch.Tensor], start: int) -> torch.Tensor:
        logits[..., start:] = self.logits  # no concatenation: a pass over every logit saved
        return logits

    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def add_output(self, out: torch.Tensor, probs: torch.Tensor, start: int) -> torch.Tensor:
        # [.., 1, k] @ [.., k, Dv] per query
        return out + torch.matmul(probs[..., start:][..., None, :], self.gathered)[..., 0, :]

    def attribution(self, probs: torch.Tensor, start: int) -> ReadAttribution:
        return ReadAttribution(self.slots, probs[..., start:])


@dataclass
class SharedSparseResult(SparseResult):
    """One set of k entries per token and KV head, read by its G query heads: values
    [B, Hkv, m, k, Dv], not copied G times."""

    def add_output(self, out: torch.Tensor, probs: torch.Tensor, start: int) -> torch.Tensor:
        return out + torch.einsum("bhgmk,bhmkd->bhgmd", probs[..., start:], self.gathered)


@dataclass
class AttendedResult:
    """Every entry, attended by one fused kernel apart from the plain keys: the output normalised
    over memory alone [B, Hkv, G, m, Dv] and the log-sum-exp of its logits [B, Hkv, G, m]. The
    plain softmax and this one are joined exactly by their log-sum-exps (as flash attention joins
    blocks), so the [queries x entries] logits are never written out or concatenated. No
    per-entry probabilities: a caller that needs them (attribution, reads ranked by use) asks
    for a `DenseResult`."""

    out: torch.Tensor
    lse: torch.Tensor
    weight: torch.Tensor | None = None  # memory's share of each query's mass, set by `softmax`

    spare_columns = 0

    def join(self, logits: torch.Tensor, values: list[torch.Tensor], start: int) -> torch.Tensor:
        return logits

    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        top = logits.amax(dim=-1, keepdim=True)  # finite: plain keys are never all masked (causal diagonal)
        e = torch.exp(logits - top)
        plain = top[..., 0] + torch.log(e.sum(dim=-1))  # the plain keys' log-sum-exp, one exp pass
        total = torch.logaddexp(plain, self.lse)
        self.weight = torch.exp(self.lse - total)
        return e.mul_(torch.exp(top - total[..., None]))

    def add_output(self, out: torch.Tensor, probs: torch.Tensor, start: int) -> torch.Tensor:
        return out + self.weight[..., None] * self.out

    def attribution(self, probs: torch.Tensor, start: int) -> ReadAttribution:
        raise RuntimeError("a fused every-entry read keeps no per-entry probabilities; read with whole=False")


MemoryResult = DenseResult | SparseResult | AttendedResult


class CountBias:
    """factor * max(0, log(count / mean count)) on each entry's logit, the mean over the head's
    used entries: entries that merged more tokens than average weigh more, one of a single token
    weighs like a raw token. Relative, because the paper's absolute log(count) grows without bound
    and in a long run lets memory drown the window (soak: perplexity 16 -> 29 over 600k tokens);
    never below 0, because a rare fact sits in a slot of count 1 and must not sink under the
    window (pass key at 4k: 100% vs 33% for the unclipped ratio).

    mode "absolute" is the paper's factor * log(count): with factor 1 a slot of n merged tokens
    takes the softmax mass of n raw copies of its key, which is what a vote over many similar
    entries needs (many-shot ICL: the template tokens of 250 demonstrations merge into slots of
    count ~250, and the relative bias leaves them ~1/15 of the mass their raw copies had).

    Kept while the memory is unchanged: it depends only on the counts, and a memory changes once
    per segment, not once per forward."""

    def __init__(self, factor: float, mode: str = "relative", cap: float | None = None) -> None:
        if mode not in COUNT_MODES:
            raise ValueError(f"count bias mode must be {' or '.join(COUNT_MODES)}, got {mode!r}")
        if cap is not None and not cap >= 1:
            raise ValueError(f"count bias cap must be None or >= 1, got {cap!r}")
        self.factor = float(factor)
        self.mode = mode
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        # the memory itself is kept, not its id: a freed memory's id may return with an equal version
        self._memory: Memory | None = None
        self._key: tuple[int, float] | None = None  # (its version, factor) when `cached` was made
        self.cached: torch.Tensor | None = None  # the last bias read, [B, Hkv, S]

    def __call__(self, memory: Memory, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        if not self.factor:
            return None
        key = (memory.version, self.factor)
        if self._memory is memory and self._key == key:
            return self.cached
        if self.mode == "absolute":  # a free slot (c = 0) gets 0 like a slot of one token
            self.cached = torch.log(counts.float().clamp(min=1)).mul_(self.factor)
        else:  # as log(max(1, c / max(1, mean))): the same value in fewer passes
            mean = counts.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
            self.cached = torch.log((counts / mean.clamp(min=1)).clamp(min=1)).mul_(self.factor)
        if self.cap is not None:
            self.cached.clamp_(max=self.factor * math.log(self.cap))
        self._memory, self._key = memory, key
        return self.cached


@dataclass
class ReadInput:
    """The memory as one read sees it, and the queries turned to face it."""

    keys: torch.Tensor  # [B, Hkv, S, D], placed where the placement rotates the bank
    values: torch.Tensor  # [B, Hkv, S, Dv]
    raw_keys: torch.Tensor  # [B, Hkv, S, D] position-free (the paper's key rule searches these)
    counts: torch.Tensor  # [B, Hkv, S] tokens merged into each entry (0: free)
    valid: torch.Tensor  # [B, Hkv, S]
    bias: torch.Tensor | None  # count bias [B, Hkv, S]
    queries: torch.Tensor  # [B, Hkv, G*m, D]
    g: int
    m: int
    whole: bool = False  # the caller takes memory attended on its own (`AttendedResult`)


class Read:
    """A read rule: which memory entries each query attends to, and with what logits.

    Subclasses implement `select`; `read` does what every rule shares. Chosen once per wrapper
    from the config (camelot.reads.make_read)."""

    needs_raw_keys = False  # the rule searches by the token's own position-free key

    def __init__(self, search: SearchBackend, top_k: int | None, count_bias: float,
                 count_mode: str = "relative", count_cap: float | None = None) -> None:
        self.search = search
        self.top_k = top_k
        self.count_bias = CountBias(count_bias, count_mode, count_cap)

    def read(self, query: torch.Tensor, memory: Memory, positions: Positions, tail: int, scaling: float,
             softcap: float | None, bias: PositionBias | None,
             raw_key: torch.Tensor | None = None, start: int = 0, whole: bool = False) -> MemoryResult | None:
        """start: position of the first query (rules that place memory per query use it); whole:
        the caller needs no per-entry probabilities, so a read of every entry may be fused."""
        state = memory.readable()
        if state is None:
            return None
        keys, values, counts, valid = state
        b, hq, m, d = query.shape
        hkv = keys.shape[1]
        g = hq // hkv
        raw_keys = keys
        if positions.rotates_memory:  # each slot where it was last written: rotate the bank
            keys = positions.placed_memory(keys, memory, tail)
            qm = query.float()
        else:
            qm = positions.memory_query(query)
        inp = ReadInput(keys, values, raw_keys, counts, valid, self.count_bias(memory, counts, valid),
                        qm.reshape(b, hkv, g * m, d), g, m, whole and bias is None)
        result = self.select(inp, scaling, softcap, raw_key)
        if bias is not None:  # ALiBi: entries are chosen by content, then biased by their distance
            result = result.materialized() if isinstance(result, DenseResult) else result
            result.logits = result.logits + bias.bias(_positions_of(result, positions, memory, tail), hkv, g)
        return result

    def select(self, inp: ReadInput, scaling: float, softcap: float | None,
               raw_key: torch.Tensor | None) -> MemoryResult:
        raise NotImplementedError

    def k_of(self, n: int) -> int:
        return n if self.top_k is None else min(self.top_k, n)


def _positions_of(result: MemoryResult, positions: Positions, memory: Memory, tail: int) -> torch.Tensor:
    """Positions broadcastable against a result's logits."""
    pos = positions.memory_positions(memory, tail, result.logits.device)
    if isinstance(result, DenseResult):
        return pos[:, :, None, None, :] if pos.dim() == 3 else pos
    idx = result.slots
    if pos.dim() == 3:  # per-slot positions: each query's own chosen slots
        return pos.gather(2, idx.flatten(2)).view_as(idx)
    if pos.numel() > 1:  # one position per stored token, shared by all heads
        return pos[idx]
    return pos
