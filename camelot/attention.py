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

from dataclasses import dataclass, field

import torch

from camelot.memory import RawWindow, SinkTokens, SlotBank, TokenStore
from camelot.rope import RopeSpec, cos_sin, place_keys, place_queries_for_memory, unrotate_keys
from camelot.rows import gather_rows
from camelot.search import SearchBackend
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
    local_k: torch.Tensor | None = None  # rotated at positions [0, local_len), model dtype
    local_v: torch.Tensor | None = None
    last_read: LastRead | None = None
    _cs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def local_len(self) -> int:
        return 0 if self.local_k is None else self.local_k.shape[2]

    def reset(self) -> None:
        self.local_k = self.local_v = None
        self.last_read = self._cs = None
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
            pos = torch.arange(self.local_len, device=self.local_k.device)
            raw = unrotate_keys(self.rope, self.local_k, pos)
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
        self.local_k = self.local_v = None

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
        qg = query.float().reshape(b, hkv, g, m, d)
        ali = None if alibi is None else (alibi, hkv, g)

        q_pos = torch.arange(l0, l0 + m, device=dev)
        logits = [self._local_logits(qg, k_loc, q_pos, scaling, softcap, sliding_window, ali)]
        values = [v_loc]
        p = 0 if self.prefix is None else self.prefix.size
        if p:
            k_pos = torch.arange(-p, 0, device=dev)
            logits.append(self._raw_logits(qg, self.prefix.keys, k_pos, q_pos, scaling, softcap, sliding_window, ali))
            values.append(self.prefix.values)
        if self.sink is not None and self.sink.size:  # right before the raw tail, as StreamingLLM places them
            k_pos = torch.arange(-p - self.sink.size, -p, device=dev)
            logits.append(self._raw_logits(qg, self.sink.keys, k_pos, q_pos, scaling, softcap, sliding_window,
                                           ali))
            values.append(self.sink.values)
        mem = self._memory_read(query, scaling, softcap, ali) if self.memory is not None else None
        if mem is not None and mem.values is not None:  # dense read: memory joins like a prefix
            logits.append(mem.logits)
            values.append(mem.values)
            mem_cols = mem.logits.shape[-1]
        n_plain = sum(x.shape[-1] for x in logits)
        if mem is not None and mem.values is None:
            logits.append(mem.logits)
        probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        vals = torch.cat([v.float() for v in values], dim=2)  # [B, Hkv, N, Dv]
        out = torch.matmul(probs[..., :n_plain], vals[:, :, None])  # [B, Hkv, G, m, Dv]
        if mem is not None:
            if mem.values is None:  # sparse read: each query's own gathered slots
                p_mem = probs[..., n_plain:]
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
        return out.reshape(b, hq, m, -1).transpose(1, 2).to(query.dtype)

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _cap(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
        return x if not softcap else torch.tanh(x / softcap) * softcap

    def _local_logits(self, qg, k_loc, q_pos, scaling, softcap, sliding_window, ali=None):
        s = torch.matmul(qg, k_loc.float()[:, :, None].transpose(-1, -2)) * scaling
        s = self._cap(s, softcap)
        k_pos = torch.arange(k_loc.shape[2], device=qg.device)
        if ali is not None:
            s = s + _alibi(ali, k_pos)
        return s.masked_fill(~_allowed(q_pos, k_pos, sliding_window), float("-inf"))

    def _raw_logits(self, qg, keys, k_pos, q_pos, scaling, softcap, sliding_window, ali=None):
        k_pre = place_keys(self.rope, keys, k_pos)
        s = torch.matmul(qg, k_pre[:, :, None].transpose(-1, -2)) * scaling
        s = self._cap(s, softcap)
        if ali is not None:
            s = s + _alibi(ali, k_pos)
        return s.masked_fill(~_allowed(q_pos, k_pos, sliding_window), float("-inf"))

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

    def _memory_read(self, query, scaling, softcap, ali=None) -> MemoryRead | None:
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
        bias = None
        if self.count_bias:
            # max(0, log(count / mean count)) over the head's used slots: slots that merged more
            # tokens than average weigh more, a slot of one token weighs like a raw token. Relative,
            # because the paper's absolute log(count) grows without bound and in a long run lets
            # memory drown the window (soak: perplexity 16 -> 29 over 600k tokens); never below 0,
            # because a rare fact sits in a slot of count 1 and must not be pushed under the
            # window (pass key at 4k: 100% vs 33% for the unclipped ratio).
            mean = counts.sum(-1, keepdim=True).float() / valid.sum(-1, keepdim=True).clamp(min=1)
            ratio = torch.log(counts.clamp(min=1).float()) - torch.log(mean.clamp(min=1))
            bias = self.count_bias * ratio.clamp(min=0)
        n_slots = keys.shape[2]
        k = n_slots if self.top_k is None else min(self.top_k, n_slots)
        if getattr(self.search, "dense", False) and k * SPARSE_BELOW > n_slots:
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
                    s = s.masked_fill(~torch.zeros_like(raw, dtype=torch.bool).scatter_(-1, idx, True),
                                      float("-inf"))
                    idx = idx.reshape(b, hkv, g, m, k)
                s = (s + slot_bias).view(b, hkv, g, m, -1)
            if ali is not None:  # ALiBi: slots are chosen by content, then biased by their distance
                pos = self._memory_positions(s.device)
                s = s + _alibi(ali, pos[:, :, None, None, :] if pos.dim() == 3 else pos)
            return MemoryRead(s, idx, values=values)
        scores, idx = self.search.topk(qm, keys, valid, k)  # [B, Hkv, G*m, k]
        s = self._cap(scores * scaling, softcap)
        if bias is not None:
            s = s + bias.gather(2, idx.flatten(2)).view_as(idx)
        s = s.masked_fill(torch.isneginf(scores), float("-inf"))  # softcap must not revive empty slots
        k = idx.shape[-1]
        if ali is not None:
            pos = self._memory_positions(s.device)
            if pos.dim() == 3:  # per-slot positions: each query's own chosen slots
                pos = pos.gather(2, idx.flatten(2)).view(b, hkv, g, m, k)
            elif pos.numel() > 1:  # one position per stored token, shared by all heads
                pos = pos[idx].view(b, hkv, g, m, k)
            s = (s.view(b, hkv, g, m, k) + _alibi(ali, pos)).view_as(idx)
        v = gather_rows(values, idx).view(b, hkv, g, m, k, -1).float()
        return MemoryRead(s.view(b, hkv, g, m, k), idx.view(b, hkv, g, m, k), gathered=v)


@dataclass
class MemoryRead:
    logits: torch.Tensor  # [B, Hkv, G, m, S] (dense) or [B, Hkv, G, m, k] (sparse)
    slots: torch.Tensor | None  # [B, Hkv, G, m, k] slots read by each query; None: every slot (dense)
    values: torch.Tensor | None = None  # dense: [B, Hkv, S, Dv], shared by all queries
    gathered: torch.Tensor | None = None  # sparse: [B, Hkv, G, m, k, Dv]


def _alibi(ali: tuple[Alibi, int, int], positions: torch.Tensor) -> torch.Tensor:
    alibi, hkv, g = ali
    return alibi.bias(positions, hkv, g)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    diff = q_pos[:, None] - k_pos[None, :]
    ok = diff >= 0
    if sliding_window:
        ok = ok & (diff < sliding_window)
    return ok


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
