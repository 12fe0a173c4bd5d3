"""The attention function camelot registers with transformers, and the per-layer runtime it
calls: one layer's state (`LayerState`), the placement of its keys (`Positions`) and its read
rule (`camelot.reads`), joined by a short `attend`.

Local, raw-context and memory logits go through ONE softmax, so with an empty memory the output
is exactly local attention, and with memory it is exact attention over the union.
"""

from __future__ import annotations

import torch

from camelot.interfaces import Memory, PositionBias, SearchBackend
from camelot.layer_state import LayerState
from camelot.masks import MaskCache, plain_logits
from camelot.memory import RawWindow, SinkTokens
from camelot.positions import Positions
from camelot.question import question_logits
from camelot.reads import Read, ReadAttribution, make_read
from camelot.rope import RopeSpec

ATTN_NAME = "camelot"


class LayerRuntime:
    """One attention layer under camelot: what it holds, where its keys sit, how it reads memory."""

    def __init__(self, layer_idx: int, state: LayerState, positions: Positions, read: Read,
                 masks: MaskCache | None = None, record_reads: bool = False) -> None:
        self.layer_idx = layer_idx
        self.state = state
        self.positions = positions
        self.read = read
        self.masks = MaskCache() if masks is None else masks
        self.record_reads = record_reads
        self.last_read: ReadAttribution | None = None
        # set by camelot.question while a question runs: its position-free queries, grouped by KV head
        self.capture: list[torch.Tensor] | None = None
        # set by camelot.surprise while a forward runs for the window's own surprise: attend to the
        # open segment, raw tail and sinks only, and keep nothing
        self.shadow = False
        # set by camelot.logit_gain (surprise_from="logit"): keep what the memory read changed in
        # the attention output, [B, m, Hq * Dv] before the output projection (None: nothing read)
        self.wants_gain = False
        self.gain: torch.Tensor | None = None
        # with it (CamelotConfig.surprise_reach), the raw keys further than this from a query count as memory
        self.gain_reach: int | None = None

    @classmethod
    def build(cls, layer_idx: int, rope: RopeSpec | None, memory: Memory | None, prefix: RawWindow | None,
              search: SearchBackend, top_k: int | None, distance: int, count_bias: float, placement: str = "fixed",
              count_mode: str = "relative", count_cap: float | None = None,
              sink: SinkTokens | None = None, max_distance: int | None = None, record_reads: bool = False,
              retrieve: str = "query", masks: MaskCache | None = None, read: Read | None = None) -> LayerRuntime:
        """A runtime from plain settings (what the wrapper and tests use); `read`: a rule the
        memory kind needs (InfLLM's block read) instead of the one `retrieve` names."""
        return cls(layer_idx, LayerState(memory, prefix, sink), Positions(rope, distance, placement, max_distance),
                   make_read(search, top_k, retrieve, count_bias, count_mode, count_cap) if read is None else read,
                   masks, record_reads)

    @property
    def search(self) -> SearchBackend:
        return self.read.search

    @search.setter
    def search(self, backend: SearchBackend) -> None:
        self.read.search = backend

    def reset(self) -> None:
        self.state.reset()
        self.positions.reset()
        self.read.search.reset()  # index backends hold a copy of the keys they indexed
        self.read.count_bias.reset()
        self.masks.clear()  # derived from geometry only, but nothing of a document outlives reset
        self.last_read = None

    def flush(self) -> None:
        """Close the open segment: its keys lose their positions and go to sinks, tail, memory."""
        self.state.flush(self.positions.unplaced)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               softcap: float | None, sliding_window: int | None,
               alibi: PositionBias | None = None) -> torch.Tensor:
        """query [B, Hq, m, D]; key/value [B, Hkv, m, D] of the new tokens -> output [B, m, Hq, Dv].
        alibi: a position bias for models without rotary positions (from their adapter)."""
        st, pos = self.state, self.positions
        b, hq, m, d = query.shape
        hkv = key.shape[1]
        g = hq // hkv
        l0 = st.local_len
        k_loc, v_loc = st.extend(key, value)
        shadow = self.shadow
        if self.capture is not None and not shadow:
            self.capture.append(pos.unplaced(query, l0).reshape(b, hkv, g * m, d))
        raw_open = raw_key = None
        mem = None
        if st.memory is not None and not shadow:
            if self.read.needs_raw_keys:  # kept for the write at flush, which needs them position-free too
                raw_key = pos.unplaced(key, l0)
                raw_open = raw_key if l0 == 0 else torch.cat([st.raw_open(pos.unplaced), raw_key], dim=2)
            # per-entry probabilities are needed only to attribute reads, their sums to rank slots by use
            whole = not (self.record_reads or st.memory.observes_reads)
            mem = self.read.read(query, st.memory, pos, st.tail, scaling, softcap, alibi, raw_key, start=l0,
                                 whole=whole)

        # The open segment, the raw tail and the sinks are plain keys at known positions: one
        # matmul, one mask, one position bias over all of them.
        keys, values, spans = [k_loc.float()], [v_loc], [(0, l0 + m)]  # spans: [start, end) positions
        p = st.tail
        if p:
            keys.append(pos.placed(st.prefix.keys, -p, 0))
            values.append(st.prefix.values)
            spans.append((-p, 0))
        if st.sink is not None and st.sink.size:  # right before the raw tail, as StreamingLLM places them
            ns = st.sink.size
            keys.append(pos.placed(st.sink.keys, -p - ns, -p))
            values.append(st.sink.values)
            spans.append((-p - ns, -p))
        n_plain = sum(x.shape[2] for x in keys)
        if mem is not None and mem.spare_columns:
            keys.append(keys[0].new_zeros(b, hkv, mem.spare_columns, d))
        plain_k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
        qg = query.float().reshape(b, hkv, g * m, d)  # a KV head's G query heads as rows of one matrix
        logits = plain_logits(self.masks, qg, g, plain_k, l0, tuple(spans), scaling, softcap, sliding_window, alibi,
                              extra=getattr(mem, "extra_columns", 0))
        if mem is not None:
            logits = mem.join(logits, values, n_plain)
        probs = torch.softmax(logits, dim=-1) if mem is None else mem.softmax(logits)
        vals = values[0].float() if len(values) == 1 else torch.cat([v.float() for v in values], dim=2)
        n_vals = vals.shape[2]
        # the G query heads' rows in one matrix per KV head: values are not expanded over G
        rows = probs.view(b, hkv, g * m, -1)
        reach = self.gain_reach if self.wants_gain else None
        gain = self.wants_gain and (mem is not None or reach is not None)
        if gain and n_vals > n_plain:  # memory's values in the matmul: the plain keys' part apart, same FLOPs
            plain = torch.matmul(rows[..., :n_plain], vals[:, :, :n_plain]).view(b, hkv, g, m, -1)
            out = plain + torch.matmul(rows[..., n_plain:n_vals], vals[:, :, n_plain:]).view(b, hkv, g, m, -1)
        else:
            out = torch.matmul(rows[..., :n_vals], vals).view(b, hkv, g, m, -1)
            plain = out
        if shadow:
            return out.reshape(b, hq, m, -1).transpose(1, 2).to(query.dtype)
        if mem is not None:
            out = mem.add_output(out, probs, n_vals)
            if self.record_reads:
                self.last_read = mem.attribution(probs, n_plain)
            if st.memory.observes_reads:  # a write rule ranks slots by use
                st.memory.observe_reads(mem.attribution(probs, n_plain).mass(st.memory.readable()[0].shape[2]))
        if gain:
            self.gain = credited(out, plain, probs, vals, n_plain, l0, m, p, reach).reshape(b, hq, m, -1).transpose(
                1, 2).reshape(b, m, -1)
        # attention each open / tail token received, per KV head, for a memory that wants it
        received = probs[..., : l0 + m + p].sum(dim=(2, 3)) if st.tracks_received else None
        st.keep(k_loc, v_loc, raw_open, received)
        if st.tracks_question:  # CamelotModel.step refuses to run without one
            st.note_question(question_logits(st.question, pos.unplaced(key, l0) if raw_key is None else raw_key,
                                             scaling))
        return out.reshape(b, hq, m, -1).transpose(1, 2).to(query.dtype)


def credited(out: torch.Tensor, plain: torch.Tensor, probs: torch.Tensor, vals: torch.Tensor, n_plain: int,
             l0: int, m: int, p: int, reach: int | None) -> torch.Tensor:
    """[B, Hkv, G, m, Dv]: what memory gave the output (out minus exact attention over the plain
    keys alone), and with `reach`, what the open segment and raw tail further than `reach` from
    each query gave too (out minus attention over the sinks and the keys within reach alone): a
    needle that copies a template from a needle still raw costs the model little, and counts only
    as what a reader of its last `reach` tokens would have paid. plain: the plain keys' part of
    `out`; probs [B, Hkv, G, m, N] over [open (l0 + m), tail (p), sinks, memory]."""
    n = l0 + m + p
    if reach is None or n - 1 <= reach:  # every raw key is within reach of every query
        return out - plain / probs[..., :n_plain].sum(-1, keepdim=True).clamp_min(1e-30)
    # only the keys within reach of the first query or later ones, and the sinks: at most
    # m + reach + sinks columns, not the whole tail; two slices (open; tail then sinks), no gather
    dev, (b, hkv, g) = probs.device, probs.shape[:3]
    first = l0 - reach  # the oldest position any query keeps
    a = max(first, 0)  # the first open column kept
    t = l0 + m if first <= -p else n + min(first, 0)  # the first tail column kept (n: none)
    q = torch.arange(l0, l0 + m, device=dev)[:, None]
    near_open = probs[..., a : l0 + m] * ((q - torch.arange(a, l0 + m, device=dev)) <= reach).to(probs.dtype)
    tail_pos = torch.arange(t - n, 0, device=dev)  # the tail's positions are -p .. -1
    keep = torch.cat([(q - tail_pos) <= reach, torch.ones(m, n_plain - n, dtype=torch.bool, device=dev)], -1)
    near_rest = probs[..., t:n_plain] * keep.to(probs.dtype)
    local = (torch.matmul(near_open.reshape(b, hkv, g * m, -1), vals[:, :, a : l0 + m])
             + torch.matmul(near_rest.reshape(b, hkv, g * m, -1), vals[:, :, t:n_plain])).view(b, hkv, g, m, -1)
    kept = near_open.sum(-1, keepdim=True) + near_rest.sum(-1, keepdim=True)
    return out - local / kept.clamp_min(1e-30)


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
