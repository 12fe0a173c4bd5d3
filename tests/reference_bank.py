"""A slow, obviously-correct token-by-token model of the CAMELoT write rule, one (row, head) at a
time with plain Python lists. The library's vectorised bank is tested against it."""

from __future__ import annotations

import math


class ReferenceBank:
    def __init__(self, slots: int, threshold: float) -> None:
        self.slots = slots
        self.threshold = threshold
        self.keys: list[list[float] | None] = [None] * slots
        self.values: list[list[float] | None] = [None] * slots
        self.counts = [0] * slots
        self.ages = [0] * slots
        self.merged = self.new = self.evicted = self.skipped = 0

    def write(self, k: list[float], v: list[float]) -> None:
        if not all(math.isfinite(x) for x in k + v):
            self.skipped += 1
            self.ages = [a + 1 for a in self.ages]
            return
        best, best_sim = None, -math.inf
        for i in range(self.slots):
            if self.counts[i] > 0:
                sim = _cos(k, self.keys[i])
                if sim > best_sim:
                    best, best_sim = i, sim
        if best is not None and best_sim >= self.threshold:
            c = self.counts[best]
            self.keys[best] = [(c * a + b) / (c + 1) for a, b in zip(self.keys[best], k)]
            self.values[best] = [(c * a + b) / (c + 1) for a, b in zip(self.values[best], v)]
            self.counts[best] = c + 1
            target = best
            self.merged += 1
        else:
            free = [i for i in range(self.slots) if self.counts[i] == 0]
            if free:
                target = free[0]
                self.new += 1
            else:
                oldest = max(self.ages)
                target = self.ages.index(oldest)
                self.evicted += 1
            self.keys[target], self.values[target], self.counts[target] = list(k), list(v), 1
        self.ages = [0 if i == target else a + 1 for i, a in enumerate(self.ages)]


def _cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a)) or 1e-12
    nb = math.sqrt(sum(x * x for x in b)) or 1e-12
    return sum(x * y for x, y in zip(a, b)) / (max(na, 1e-12) * max(nb, 1e-12))
