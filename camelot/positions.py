"""Where every key of a memory layer sits, and the rotary arithmetic that puts it there.

Positions are the layer's own: the open segment at [0, local_len), the raw tail right before it
at [-p, 0), the sinks before the tail, memory at `-distance` (fixed placement) or at each slot's
last write (recency). Rotary models carry positions in their keys (the maths is in `rope.py`;
this module keeps the cos/sin it needs, which are the same segment after segment). Models with
a position bias instead (ALiBi: falcon, bloom) get it from their adapter as a `PositionBias`.
"""

from __future__ import annotations

import torch

from camelot.interfaces import Memory
from camelot.rope import RopeSpec, cos_sin, place_keys, place_queries_for_memory, unrotate_keys

_RANGES_KEPT = 8  # the tail, the sinks and a whole segment: only generation asks for new ranges


class Positions:
    """One layer's placement of keys.

    rope: the layer's rotary embedding, None where keys carry no rotation (absolute, ALiBi).
    distance: how far before the segment memory sits (fixed placement).
    placement: "fixed" (every slot at `-distance`), "recency" (each at its last write) or
        "mixed" (an entry holding one token, never merged, at its last write, which is exactly
        where that token was; merged entries fixed).
    max_distance: farthest a memory key may be placed (recency), from the model's range.
    """

    def __init__(self, rope: RopeSpec | None, distance: int, placement: str = "fixed",
                 max_distance: int | None = None) -> None:
        self.rope = rope
        self.distance = distance
        self.placement = placement
        self.max_distance = max_distance
        self.reset()

    def reset(self) -> None:
        self._ranges: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fixed_pos: torch.Tensor | None = None
        # recency / mixed: the last placement and what it was made from (the memory itself, not its
        # id, as reads.base.CountBias keeps it): it changes only when memory is written
        self._placed_for: tuple | None = None
        self._placed: torch.Tensor | None = None

    def _range_cos_sin(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (start, end, device)
        cs = self._ranges.get(key)
        if cs is None:
            if len(self._ranges) >= _RANGES_KEPT:
                self._ranges.clear()
            cs = self._ranges[key] = cos_sin(self.rope, torch.arange(start, end), device)
        return cs

    def placed(self, raw: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Position-free keys [B, H, end - start, D] placed at positions [start, end) (fp32)."""
        if self.rope is None:
            return raw.float()
        return place_keys(self.rope, raw, None, self._range_cos_sin(start, end, raw.device))

    def unplaced(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Keys at positions [start, start + T) -> position-free keys (fp32)."""
        if self.rope is None:
            return keys.float()
        return unrotate_keys(self.rope, keys, None, self._range_cos_sin(start, start + keys.shape[2], keys.device))

    def memory_query(self, query: torch.Tensor) -> torch.Tensor:
        """Queries [B, Hq, m, D] turned so that their dot product with a position-free key is the
        score against that key placed at `-distance` (fixed placement: memory is never rotated)."""
        if self.rope is None:
            return query.float()
        if self._fixed is None or self._fixed[0].device != query.device:
            # built once: every read needs it, and on a GPU building it is a host-to-device copy
            self._fixed = cos_sin(self.rope, torch.tensor(self.distance), query.device)
        return place_queries_for_memory(self.rope, query, self.distance, self._fixed)

    def fixed_memory_query(self, query: torch.Tensor, start: int) -> torch.Tensor:
        """Queries [B, Hq, m, D] at positions [start, start + m) turned so that EVERY one of them
        meets a position-free key exactly `distance` positions before it (InfLLM rotates its
        memory query at one angle), not `distance` before the segment as `memory_query` does."""
        if self.rope is None:
            return query.float()
        # take the query's own rotation off, keeping HF's cos/sin factor (which memory_query
        # adds once more, as it does to a rotated query)
        plain = self.unplaced(query, start)
        return self.memory_query(plain * self.rope.scaling if self.rope.scaling != 1.0 else plain)

    def memory_positions(self, memory: Memory, tail: int, device: torch.device) -> torch.Tensor:
        """Where memory keys sit: [1] (fixed), [S] or [B, Hkv, S] (recency, mixed), negative."""
        if self.placement == "fixed":
            if self._fixed_pos is None or self._fixed_pos.device != device:  # no host-to-device copy per read
                self._fixed_pos = torch.tensor([-self.distance], device=device)
            return self._fixed_pos
        key = (memory.version, tail, device)
        if self._placed_for is not None and self._placed_for[0] is memory and self._placed_for[1:] == key:
            return self._placed
        pos = memory.positions().to(device) - tail  # the raw tail sits between memory and the segment
        if self.max_distance is not None:
            pos = packed_beyond(pos, self.max_distance, tail)
        if self.placement == "mixed":  # a merged slot's last write is not where its tokens were: fixed
            counts = memory.readable()[2].to(device)
            pos = pos.masked_fill(counts != 1, -self.distance)
        if self.max_distance is not None:
            pos = pos.clamp(min=-self.max_distance)
        self._placed_for, self._placed = (memory, *key), pos
        return pos

    @property
    def rotates_memory(self) -> bool:
        """Recency or mixed placement on a rotary model rotates the bank itself (each slot its own place)."""
        return self.placement != "fixed" and self.rope is not None

    def placed_memory(self, keys: torch.Tensor, memory: Memory, tail: int) -> torch.Tensor:
        return place_keys(self.rope, keys, self.memory_positions(memory, tail, keys.device))


def packed_beyond(pos: torch.Tensor, limit: int, tail: int) -> torch.Tensor:
    """Slot positions [..., S] (negative) fitted into the model's range where some lie beyond it.

    Clamping would put every slot older than `limit` at one position, so a number kept digit by
    digit would lose its order. Instead a (sequence, head) with a slot beyond the range gets its
    slots packed one per position right behind the raw tail, newest nearest: order and the
    adjacency of tokens written side by side are kept, and an old fact sits no farther than the
    number of slots written after it (docs/retrieval.md: SmolLM2 at 16k finds 8 of 10 needles
    this way, 2 of 10 clamped; shrinking only the gaps between slots found older needles and lost
    newer ones). Heads with every slot in range keep their exact places.
    """
    dist = -pos
    s = dist.shape[-1]
    if s == 0:
        return pos
    rank = torch.empty_like(dist)
    order = dist.argsort(dim=-1, stable=True)
    rank.scatter_(-1, order, torch.arange(1, s + 1, device=dist.device, dtype=dist.dtype).expand_as(dist))
    beyond = (dist > limit).any(dim=-1, keepdim=True)
    return -torch.where(beyond, rank + tail, dist)
