"""The attention function camelot registers with transformers, and the per-layer runtime it
reads: the open segment's KV, an optional raw prefix, and the layer's memory.

Local, prefix and memory logits go through ONE softmax, so with an empty memory the output is
exactly local attention, and with memory it is exact attention over the union.

Positions are the runtime's own: the open segment's keys sit at [0, local_len), a raw prefix at
[-p, 0), memory at `-distance` (fixed placement) or at each slot's last-write position (recency).
Rotary models carry them in the keys; ALiBi models (falcon, bloom) pass an `Alibi` and get
`slope * key_position` added to every logit, memory included, which is the same relative bias
HF adds (a per-row constant does not change a softmax).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from camelot.memory import RawWindow, SinkTokens, SlotBank, TokenStore
from camelot.rope import RopeSpec, cos_sin, place_keys, place_queries_for_memory, unrotate_keys
from camelot.rows import gather_rows
from camelot.search import SearchBackend, top_indices
from camelot.topk import topk as rowwise_topk

ATTN_NAME = "camelot"
# The torch backend reads sparsely (gathered top-k values) where top_k * SPARSE_BELOW <= slots.
SPARSE_BELOW = 16


@dataclass(frozen=True)
class Alibi:
    """ALiBi as HF's falcon/bloom compute it: logit += scale * bf16(slope_bf16 * key_position).

    slopes: [Hq] per query head, already rounded to bfloat16 as `build_alibi_tensor` does.
    scale: factor the model applies to the bias (falcon: 1/sqrt(head_dim); bloom: 1).
    round_bf16: HF materialises the bias in bfloat16; matching that keeps identity exact.
    """

    slopes: torch.Tensor
    scale: float = 1.0
    round_bf16: bool = True

    def bias(self, positions: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
        """positions broadcastable against [Hkv, G, 1, 1] (e.g. [N], or [B, Hkv, 1, 1, S]) -> bias."""
        slopes = self.slopes.to(device=positions.device, dtype=torch.float32).view(hkv, g, 1, 1)
        b = slopes * positions.float()
        if self.round_bf16:
            b = b.to(torch.bfloat16).float()
        return b * self.scale if self.scale != 1.0 else b


@dataclass
class LastRead:
    """Which memory slots each query read in the last forward (retrieval attribution)."""

    slots: torch.Tensor  # [B, Hkv, G, m, k]
    weights: torch.Tensor  # [B, Hkv, G, m, k] share of attention mass on each slot


@dataclass
class LayerRuntime:
    layer_idx: int
    rope: RopeSpec | None
    memory: SlotBank | TokenStore | None
    prefix: RawWindow | None
    search: SearchBackend
    top_k: int | None  # None: every slot
    distance: int
    count_bias: float  # factor of the log(count / mean count) bias; 0: off
    placement: str = "fixed"
    sink: SinkTokens | None = None
    max_distance: int | None = None  # farthest position a memory key may be placed at (recency)
    record_reads: bool = False
    retrieve: str = "query"  # top-k read: per query head, per KV head ("group") or by the token's key (paper)
    local_k: torch.Tensor | None = None  # rotated at positions [0, local_len), model dtype
    local_v: torch.Tensor | None = None
    # position-free local keys where the read needed them (fp32), valid while local_k is `_raw_for`
    # (checkpoints and snapshots set local_k directly)
    local_raw: torch.Tensor | None = None
    _raw_for: torch.Tensor | None = field(default=None, repr=False)
    last_read: LastRead | None = None
    _cs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _range_cs: dict = field(default_factory=dict, repr=False)
    _bias: tuple | None = field(default=None, repr=False)  # (memory, (its version, factor), count bias)

    @property
    def local_len(self) -> int:
        return 0 if self.local_k is None else self.local_k.shape[2]

    def reset(self) -> None:
        self.local_k = self.local_v = self.local_raw = self._raw_for = None
        self.last_read = self._cs = self._bias = None
        self._range_cs.clear()
        if self.memory is not None:
            self.memory.reset()
        if self.prefix is not None:
            self.prefix.reset()
        if self.sink is not None:
            self.sink.reset()
        if hasattr(self.search, "reset"):  # index backends hold a copy of the keys they indexed
            self.search.reset()

    def flush(self) -> None:
        """Close the open segment: its keys lose their positions and go to memory / prefix."""
        if self.local_k is None:
            return
        if self.memory is not None or self.prefix is not None or self.sink is not None:
            raw = self._local_raw()
            v = self.local_v
            if self.sink is not None and not self.sink.full:
                raw, v = self.sink.write(raw, v)
            if self.prefix is None:
                if self.memory is not None:
                    self.memory.write(raw, v)
            else:
                # With both, the prefix is the raw recent tail: tokens reach memory as they leave it.
                out = self.prefix.write(raw, v.float())
                if self.memory is not None and out is not None:
                    self.memory.write(*out)
        self.local_k = self.local_v = self.local_raw = self._raw_for = None

    def _local_raw(self) -> torch.Tensor:
        """The open segment's keys, position-free."""
        if self.local_raw is not None and self._raw_for is self.local_k:
            return self.local_raw
        return self._unplaced(self.local_k, 0)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               softcap: float | None, sliding_window: int | None,
               alibi: Alibi | None = None) -> torch.Tensor:
        """query [B, Hq, m, D]; key/value [B, Hkv, m, D] of the new tokens -> output [B, m, Hq, Dv].
        alibi: ALiBi bias rule for models without rotary positions (falcon/bloom adapters)."""
        b, hq, m, d = query.shape
        hkv = key.shape[1]
        g = hq // hkv
        dev = query.device
        l0 = self.local_len
        if l0 and self.local_k.shape[0] != b:
            raise ValueError(f"the open segment holds {self.local_k.shape[0]} sequence(s), this input has {b}; "
                             "call reset() before changing the batch size")
        k_loc = key if l0 == 0 else torch.cat([self.local_k, key], dim=2)
        v_loc = value if l0 == 0 else torch.cat([self.local_v, value], dim=2)
        qg = query.float().reshape(b, hkv, g * m, d)  # a KV head's G query heads as rows of one matrix
        ali = None if alibi is None else (alibi, hkv, g)

        mem = None
        if self.memory is not None:
            raw_key = None
            if self.retrieve == "key":  # kept for the write at flush, which needs them position-free too
                raw_key = self._unplaced(key, l0)
                self.local_raw = raw_key if l0 == 0 else torch.cat([self._local_raw(), raw_key], dim=2)
            mem = self._memory_read(query, scaling, softcap, ali, raw_key)
        # The open segment, the raw tail and the sinks are plain keys at known positions: one
        # matmul, one mask, one position bias over all of them.
        keys, values, spans = [k_loc.float()], [v_loc], [(0, l0 + m)]  # spans: [start, end) positions
        p = 0 if self.prefix is None else self.prefix.size
        if p:
            keys.append(self._placed(self.prefix.keys, -p, 0))
            values.append(self.prefix.values)
            spans.append((-p, 0))
        if self.sink is not None and self.sink.size:  # right before the raw tail, as StreamingLLM places them
            ns = self.sink.size
            keys.append(self._placed(self.sink.keys, -p - ns, -p))
            values.append(self.sink.values)
            spans.append((-p - ns, -p))
        n_plain = sum(x.shape[2] for x in keys)
        sparse = mem is not None and mem.values is None
        if sparse:
            # a sparse read's k logits go into k spare columns of the same matrix: no concatenation
            # of logits (a pass over all of them) before the softmax
            keys.append(keys[0].new_zeros(b, hkv, mem.logits.shape[-1], d))
        plain_k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
        logits = self._plain_logits(qg, g, plain_k, l0, tuple(spans), scaling, softcap, sliding_window, ali)
        if sparse:
            logits[..., n_plain:] = mem.logits
        elif mem is not None:  # dense read: memory joins like a prefix
            logits = torch.cat([logits, mem.logits], dim=-1)
            values.append(mem.values)
            mem_cols = mem.logits.shape[-1]
            n_plain += mem_cols
        probs = torch.softmax(logits, dim=-1)
        vals = values[0].float() if len(values) == 1 else torch.cat([v.float() for v in values], dim=2)
        # the G query heads' rows in one matrix per KV head: values are not expanded over G
        rows = probs.view(b, hkv, g * m, -1)[..., :n_plain]
        out = torch.matmul(rows, vals).view(b, hkv, g, m, -1)  # [B, Hkv, G, m, Dv]
        if mem is not None:
            if mem.values is None:  # sparse read: each query's own gathered slots
                p_mem = probs[..., n_plain:]
                if mem.gathered.dim() == 5:  # one set per token, shared by the G query heads
                    out = out + torch.einsum("bhgmk,bhmkd->bhgmd", p_mem, mem.gathered)
                else:
                    out = out + torch.matmul(p_mem[..., None, :], mem.gathered)[..., 0, :]  # [.., 1, k] @ [.., k, Dv]
            elif self.record_reads:  # dense read: each query's share of every slot it may read
                p_mem = probs[..., n_plain - mem_cols : n_plain]
                if mem.slots is not None:
                    p_mem = p_mem.gather(-1, mem.slots)
            if self.record_reads:
                slots = mem.slots
                if slots is None:
                    slots = torch.arange(p_mem.shape[-1], device=dev).expand_as(p_mem)
                self.last_read = LastRead(slots, p_mem)
        self.local_k, self.local_v = k_loc, v_loc
        self._raw_for = k_loc if self.retrieve == "key" and self.memory is not None else None
        return out.reshape(b, hq, m, -1).transpose(1, 2).to(query.dtype)

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _cap(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
        return x if not softcap else torch.tanh(x / softcap) * softcap

    def _plain_logits(self, qg, g, keys, l0, spans, scaling, softcap, sliding_window, ali=None):
        """[B, Hkv, G, m, N] logits of queries at positions [l0, l0 + m) against the plain keys,
        whose positions are the `spans` ([start, end) ranges, in order), and against any spare
        columns past them (keys of zeros, never masked: the caller overwrites them)."""
        b, hkv, gm, d = qg.shape  # one [G*m, D] @ [D, N] per KV head: keys are not expanded over G
        m, n = gm // g, keys.shape[2]
        if not softcap and ali is None:
            # the causal / sliding mask as an additive 0 / -inf term inside the matmul: a boolean
            # mask broadcast over every head is a slow pass of its own on CPU
            bias = _mask_bias(l0, m, spans, n, sliding_window, g, qg.device)
            s = torch.baddbmm(bias, qg.flatten(0, 1), keys.flatten(0, 1).transpose(-1, -2), alpha=scaling)
            return s.view(b, hkv, g, m, n)
        s = torch.matmul(qg, keys.transpose(-1, -2)).view(b, hkv, g, m, n) * scaling
        s = self._cap(s, softcap)
        k_pos = _span_positions(spans, n, qg.device)
        if ali is not None:
            s = s + _alibi(ali, k_pos)
        return s.masked_fill_(~_allowed_spans(l0, m, spans, n, sliding_window, qg.device), float("-inf"))

    def _range_cos_sin(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions [start, end): the tail, the sinks and a whole segment sit at the
        same positions segment after segment, so they are kept (a few ranges at most)."""
        key = (start, end, device)
        cs = self._range_cs.get(key)
        if cs is None:
            if len(self._range_cs) >= 8:  # only generation, one token at a time, asks for new ranges
                self._range_cs.clear()
            cs = self._range_cs[key] = cos_sin(self.rope, torch.arange(start, end), device)
        return cs

    def _placed(self, raw: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Raw keys [B, H, end - start, D] placed at positions [start, end)."""
        if self.rope is None:
            return raw.float()
        return place_keys(self.rope, raw, None, self._range_cos_sin(start, end, raw.device))

    def _unplaced(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Rotated keys at positions [start, start + T) -> position-free keys (fp32)."""
        if self.rope is None:
            return keys.float()
        return unrotate_keys(self.rope, keys, None, self._range_cos_sin(start, start + keys.shape[2], keys.device))

    def _fixed_cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin at the fixed memory distance, built once: every read needs them, and on a GPU
        building them means a host-to-device copy."""
        if self.rope is None:
            return None
        if self._cs is None or self._cs[0].device != device:
            self._cs = cos_sin(self.rope, torch.tensor(self.distance), device)
        return self._cs

    def _memory_positions(self, device: torch.device) -> torch.Tensor:
        """Where memory keys sit for position biases (ALiBi): [S] or [B, Hkv, S], negative."""
        if self.placement == "recency":
            pos = self.memory.positions().to(device)
            if self.prefix is not None:  # a raw tail sits between memory and the segment
                pos = pos - self.prefix.size
            return pos.clamp(min=-self.max_distance) if self.max_distance is not None else pos
        return torch.tensor([-self.distance], device=device)

    def _count_bias(self, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] logit bias of each slot. Kept while the memory is unchanged: it depends
        only on the counts, and a memory changes once per segment, not once per forward."""
        key = (self.memory.version, self.count_bias)
        if self._bias is not None and self._bias[0] is self.memory and self._bias[1] == key:
            return self._bias[2]
        # max(0, log(count / mean count)) over the head's used slots: slots that merged more
        # tokens than average weigh more, a slot of one token weighs like a raw token. Relative,
        # because the paper's absolute log(count) grows without bound and in a long run lets
        # memory drown the window (soak: perplexity 16 -> 29 over 600k tokens); never below 0,
        # because a rare fact sits in a slot of count 1 and must not be pushed under the
        # window (pass key at 4k: 100% vs 33% for the unclipped ratio).
        # (as log(max(1, c / max(1, mean))): the same value in fewer passes over the slots; a
        # free slot, c = 0, gets 0 like a slot of one token)
        mean = counts.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        bias = torch.log((counts / mean.clamp(min=1)).clamp(min=1)).mul_(self.count_bias)
        self._bias = (self.memory, key, bias)
        return bias

    def _memory_read(self, query, scaling, softcap, ali=None, raw_key=None) -> MemoryRead | None:
        state = self.memory.readable()
        if state is None:
            return None
        keys, values, counts, valid = state
        b, hq, m, d = query.shape
        hkv = keys.shape[1]
        g = hq // hkv
        if self.placement == "recency" and self.rope is not None:
            # Each slot sits where it was last written: rotate the bank (cheaper than per query).
            keys = place_keys(self.rope, keys, self._memory_positions(keys.device))
            qm = query.float().reshape(b, hkv, g * m, d)
        else:
            qm = place_queries_for_memory(self.rope, query, self.distance, self._fixed_cos_sin(query.device))
            qm = qm.reshape(b, hkv, g * m, d)
        bias = self._count_bias(counts, valid) if self.count_bias else None
        n_slots = keys.shape[2]
        k = n_slots if self.top_k is None else min(self.top_k, n_slots)
        shared = self.retrieve != "query" and k < n_slots  # one set of slots per token and KV head
        if not shared and getattr(self.search, "dense", False) and k * SPARSE_BELOW > n_slots:
            # Exact search already scores every slot: keep those scores, mask all but the top-k,
            # and let memory join the softmax like a prefix (no gathers). Where k is a small share
            # of the slots, the sparse read below is cheaper: softmax and values over k, not S.
            # validity and count bias as one additive [B, Hkv, 1, S] term, not a fill over every query
            slot_bias = torch.where(valid, 0.0 if bias is None else bias, float("-inf"))[:, :, None, :]
            idx = None
            if k == n_slots and not softcap:
                # every slot (the default read): scale on the queries, bias inside the matmul; two
                # fewer passes over [G*m, S] scores
                s = torch.baddbmm(slot_bias.flatten(0, 1), (qm * scaling).flatten(0, 1),
                                  keys.to(qm.dtype).flatten(0, 1).transpose(-1, -2)).view(b, hkv, g, m, -1)
            else:
                raw = torch.matmul(qm, keys.to(qm.dtype).transpose(-1, -2))  # [B, Hkv, G*m, S]
                s = self._cap(raw * scaling, softcap)
                if k < n_slots:
                    idx = rowwise_topk(raw + torch.where(valid, 0.0, float("-inf"))[:, :, None, :], k)[1]
                    # exactly k per query, also where scores tie (as every top-k search backend does)
                    s = s.masked_fill_(~torch.zeros_like(raw, dtype=torch.bool).scatter_(-1, idx, True),
                                      float("-inf"))
                    idx = idx.reshape(b, hkv, g, m, k)
                s = (s + slot_bias).view(b, hkv, g, m, -1)
            if ali is not None:  # ALiBi: slots are chosen by content, then biased by their distance
                pos = self._memory_positions(s.device)
                s = s + _alibi(ali, pos[:, :, None, None, :] if pos.dim() == 3 else pos)
            return MemoryRead(s, idx, values=values)
        if shared:
            if self.retrieve == "key":
                # The paper's read: the slots nearest the token's own key, searched in the raw bank
                # (positions do not change which slots are near a key).
                idx = top_indices(self.search, raw_key.to(state[0].dtype), state[0], valid, k)  # [B, Hkv, m, k]
            else:
                # "group": the slots the KV head's G query heads weigh most together (sum of their
                # logits), one search instead of G.
                idx = top_indices(self.search, qm.view(b, hkv, g, m, d).sum(2), keys, valid, k)
            k = idx.shape[-1]
            chosen = gather_rows(keys, idx).to(qm.dtype)  # [B, Hkv, m, k, D]
            # per token, its G query heads against its k slots: [G, D] @ [D, k] (not G*k dot products)
            scores = torch.matmul(qm.view(b, hkv, g, m, d).transpose(2, 3), chosen.transpose(-1, -2))
            found = valid.gather(2, idx.flatten(2)).view(b, hkv, m, 1, k)
            scores = scores.masked_fill_(~found, float("-inf")).transpose(2, 3)  # [B, Hkv, G, m, k]
            v = gather_rows(values, idx)  # [B, Hkv, m, k, Dv]: one set per token, for its G heads
            idx = idx.view(b, hkv, 1, m, k)  # per-slot terms below broadcast over the G heads
        else:
            scores, idx = self.search.topk(qm, keys, valid, k)  # [B, Hkv, G*m, k]
            k = idx.shape[-1]
            scores, idx = scores.view(b, hkv, g, m, k), idx.view(b, hkv, g, m, k)
            v = gather_rows(values, idx)  # [B, Hkv, G, m, k, Dv]
        s = self._cap(scores * scaling, softcap)
        if bias is not None:
            s = s + bias.gather(2, idx.flatten(2)).view_as(idx)
        s = s.masked_fill_(torch.isneginf(scores), float("-inf"))  # softcap must not revive empty slots
        if ali is not None:
            pos = self._memory_positions(s.device)
            if pos.dim() == 3:  # per-slot positions: each query's own chosen slots
                pos = pos.gather(2, idx.flatten(2)).view_as(idx)
            elif pos.numel() > 1:  # one position per stored token, shared by all heads
                pos = pos[idx]
            s = s + _alibi(ali, pos)
        return MemoryRead(s, idx.expand(b, hkv, g, m, k), gathered=v.float())


@dataclass
class MemoryRead:
    logits: torch.Tensor  # [B, Hkv, G, m, S] (dense) or [B, Hkv, G, m, k] (sparse)
    slots: torch.Tensor | None  # [B, Hkv, G, m, k] slots read by each query; None: every slot (dense)
    values: torch.Tensor | None = None  # dense: [B, Hkv, S, Dv], shared by all queries
    gathered: torch.Tensor | None = None  # sparse: [B, Hkv, G, m, k, Dv]; [B, Hkv, m, k, Dv] when shared (group, key)


def _alibi(ali: tuple[Alibi, int, int], positions: torch.Tensor) -> torch.Tensor:
    alibi, hkv, g = ali
    return alibi.bias(positions, hkv, g)


# The position tensors below depend only on the segment's geometry, the same for every layer and
# segment after segment: kept (read-only), so a GPU does not get them copied over every forward.
@functools.lru_cache(maxsize=16)
def _span_positions(spans: tuple[tuple[int, int], ...], n: int, device: torch.device) -> torch.Tensor:
    """[n] key positions: the spans in order, then 0 for spare columns."""
    pos = torch.cat([torch.arange(a, e) for a, e in spans]) if spans else torch.zeros(0, dtype=torch.long)
    return torch.nn.functional.pad(pos, (0, n - pos.shape[0])).to(device)


@functools.lru_cache(maxsize=16)
def _allowed_spans(l0: int, m: int, spans: tuple[tuple[int, int], ...], n: int, sliding_window: int | None,
                   device: torch.device) -> torch.Tensor:
    """[m, n] which keys each query at [l0, l0 + m) may see (causal, sliding window); spare
    columns past the spans are allowed."""
    k_pos = _span_positions(spans, n, "cpu")
    diff = torch.arange(l0, l0 + m)[:, None] - k_pos[None, :]
    ok = diff >= 0
    if sliding_window:
        ok = ok & (diff < sliding_window)
    ok[:, sum(e - a for a, e in spans):] = True
    return ok.to(device)


@functools.lru_cache(maxsize=16)
def _mask_bias(l0: int, m: int, spans: tuple[tuple[int, int], ...], n: int, sliding_window: int | None, g: int,
               device: torch.device) -> torch.Tensor:
    """[1, G*m, n] float 0 / -inf: `_allowed_spans` as an additive term for the G*m query rows
    of a KV head (a few entries kept; generation, one token at a time, asks for new ones)."""
    ok = _allowed_spans(l0, m, spans, n, sliding_window, "cpu")
    bias = torch.zeros(m, n).masked_fill_(~ok, float("-inf"))
    return bias.repeat(g, 1)[None].to(device)


def camelot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, softcap: float | None = None,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    rt: LayerRuntime | None = getattr(module, "_camelot_runtime", None)
    if rt is None:
        raise RuntimeError(
            "camelot attention was called on a module that no camelot wrapper owns; "
            "was the model unwrapped without restoring its attention implementation?"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return rt.attend(query, key, value, scaling, softcap, sliding_window), None


def camelot_mask(*args, **kwargs) -> None:
    # camelot builds its own causal mask from positions it controls; HF's mask is not needed.
    return None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, camelot_attention)
    AttentionMaskInterface.register(ATTN_NAME, camelot_mask)
