"""The span reserve of the slot bank (WriteRule.span_reserve, docs/memory_write.md).

Why: on the needle probe the consolidated write keeps some digits of a fact but loses their
order (1424500 for 142450): each token is judged alone, and merging folds look-alike digit
slots together. The span reserve keeps the tokens of the best runs RAW: the last
`span_reserve` slots of each head hold one token each, count 1, never merged into and never
evicted by the main rule. A token's score is that of the best window of `span` consecutive
tokens containing it (the sum of their importance: attention received in the window, or the
model's surprise, WriteRule.importance), so a window that wins is kept whole, and a fact that
straddles two windows keeps both: with spans cut on a fixed grid, or one span per peak, a
needle's digits fell just outside the kept span. As tokens leave the raw tail, the best tokens
among those held and the new ones stay, a held token giving way only to a better new one.
Tokens the reserve takes skip the consolidated part of the bank; a token that loses its place
is dropped. Windows reach across writes (the bank carries the importance of the last tokens it
was written, the layer hands it that of the tokens still raw), so a fact cut by a segment
boundary is judged whole; `span_follow` keeps the tokens after a winning window (a surprising
name opens a fact whose digits come later).
"""

from __future__ import annotations

import torch

SPAN_SCORES = ("relative", "sum", "shared", "peak", "sum+peak", "scan", "scan+scan", "joint-scan")
# "sum+peak": the peak half's windows: a name with the 3 tokens before it and the 15 after it (a
# key and its value; docs/retrieval.md measured these on RULER multi-key)
PEAK_SPAN, PEAK_FOLLOW = 4, 12
# Rankings that split the reserve in two: the first part's share of the places, then per part
# (ranking, span, follow, importance channel); None: the rule's own span / follow, or the only
# channel. "scan+scan" ranks two signals ([..., 2]) in one write: the first half by the scan of
# channel 0, the second by the scan of channel 1 among the tokens the first did not take
# (importance "question+surprise": what a question will look for, and what surprised the model).
HALVES: dict[str, tuple] = {
    "sum+peak": (0.5, ("sum", None, None, None), ("peak", PEAK_SPAN, PEAK_FOLLOW, None)),
    "scan+scan": (0.5, ("scan", None, None, 0), ("scan", None, None, 1)),
}
# "joint-scan": one ranking of two signals: a window scores the sum of its two scan statistics,
# each over its signal's spread in the write's context (z-scores), so a window high on both (the
# question's key that also surprised the model) beats one high on either alone
TWO_SIGNALS = ("scan+scan", "joint-scan")  # rankings that take two importances per token, [..., 2]


def span_context(span: int, follow: int, how: str = "sum", apart: int = 0) -> int:
    """Importance values of the tokens before a segment the reserve carries over, so windows
    straddle the segment boundary: a window may start span - 1 + follow tokens before a token,
    and its rivals (`apart`) lie up to `apart` windows before that."""
    parts = HALVES[how][1:] if how in HALVES else ()
    reach = [(span if s is None else s) - 1 + (follow if f is None else f) for _, s, f, _ in parts]
    return max([span - 1 + follow, *reach]) + apart


def choose_reserve(span_score: torch.Tensor, importance: torch.Tensor, finite: torch.Tensor, span: int,
                   base: int, scratch: int, how: str, before: torch.Tensor | None = None,
                   after: torch.Tensor | None = None, follow: int = 0, apart: int = 0,
                   region: torch.Tensor | None = None, spread: int = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """choose_spans over the whole reserve, or, for the rankings of HALVES, over two parts, the
    second choosing among the tokens the first did not take. "sum+peak": the first half ranks
    windows by their sum (surprising sentences), the second by their peak (surprising names and
    what follows them: the first half keeps only a repeated fact's first copy). "scan+scan":
    importance, before and after carry two signals [..., 2], each half scans its own. region,
    spread: see choose_spans. Same returns as choose_spans."""
    if how not in HALVES:
        return choose_spans(span_score, importance, finite, span, base, scratch, how, before, after, follow,
                            apart=apart, region=region, spread=spread)
    n = span_score.shape[-1] - 1
    share, *parts = HALVES[how]
    bounds, end = (0, int(n * share), n), span_score[..., n:]
    held = slot = None
    scores = []
    for i, (rank, s, f, channel) in enumerate(parts):
        sig = [x if x is None or channel is None else x[..., channel] for x in (importance, before, after)]
        part = torch.cat([span_score[..., bounds[i] : bounds[i + 1]], end], -1)
        part_region = None if region is None else torch.cat([region[..., bounds[i] : bounds[i + 1]],
                                                             region[..., n:]], -1)
        got, where, score = choose_spans(part, sig[0], finite, span if s is None else s, base + bounds[i], scratch,
                                         rank, sig[1], sig[2], follow if f is None else f,
                                         eligible=None if held is None else ~held, apart=apart,
                                         region=part_region, spread=spread)
        held, slot = (got, where) if held is None else (held | got, torch.where(held, slot, where))
        scores.append(score[..., :-1])
    return held, slot, torch.cat([*scores, end.new_full(end.shape, float("-inf"))], -1)


def choose_spans(span_score: torch.Tensor, importance: torch.Tensor, finite: torch.Tensor, span: int,
                 base: int, scratch: int, how: str = "relative", before: torch.Tensor | None = None,
                 after: torch.Tensor | None = None, follow: int = 0, eligible: torch.Tensor | None = None,
                 apart: int = 0, region: torch.Tensor | None = None,
                 spread: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """span_score [B, H, n+1]: the held tokens' scores (-inf: empty; index n is a scratch entry);
    importance, finite [B, H, T]. before [B, H, c] / after [B, H, a]: the importance of the tokens
    just before the segment (already written; -inf: none) and just after it (still in the raw
    window), so a window is judged whole wherever segments are cut: a needle split by a segment
    boundary lost its best windows and was dropped. A token scores as the best window starting
    from span - 1 + follow tokens before it up to itself: `follow` keeps the tokens after a
    surprising run too (the run opens a fact: "Remember: <name>'s number is" then the digits).
    how: "sum", a window's score is its tokens' importance; "relative", that sum over the mean of
    the windows judged in this write (the segment's, with the context), so segments compare
    fairly (early in a document a token competes with few keys and receives much more attention:
    by the plain sum the first tokens of the document filled the reserve and stayed); "shared",
    the relative score's max over the layer's KV heads, so every head keeps what any head singled
    out. apart > 0: a window counts only where none within `apart` windows either side scores
    higher (WriteRule.span_apart). "scan": a token scores as its best window of any length in
    scan_lengths(span), each window by how far its sum exceeds length x the context's mean token,
    over sqrt(length) (a scan statistic: a two-token name and a long surprising passage compete
    fairly); the reach after each window is its length + follow. The mean is the write's context
    (carried, segment and raw tokens), so unlike "sum" a scan's scores move a little with where
    writes are cut. "joint-scan": importance, before and after [..., 2], two signals; a window
    scores the sum of their scans, each over its signal's standard deviation in the context.
    Returns (held [B, H, T]: the tokens the reserve takes, slot [B, H, T]: the slot each goes to
    (`scratch` for the others), new span_score [B, H, n+1])."""
    b, h, t = importance.shape[:3]
    n = span_score.shape[-1] - 1
    dev = importance.device
    imp = torch.where(finite if importance.dim() == 3 else finite[..., None], importance.float(), float("-inf"))
    c = 0 if before is None else before.shape[2]
    ctx = torch.cat([x for x in (before, imp, after) if x is not None], dim=2)
    if ctx.shape[2] < span:  # no whole window: the segment's tokens go to the consolidated part
        return (torch.zeros(b, h, t, dtype=torch.bool, device=dev),
                torch.full((b, h, t), scratch, dtype=torch.long, device=dev), span_score)
    if how in ("scan", "joint-scan"):  # the best of several window lengths, each by its excess over the mean
        new = torch.stack([_token_scores(_scan_or_joint(ctx, w, how), w, follow, apart, c, t)
                           for w in scan_lengths(span)]).amax(0)
    else:
        new = _token_scores(_windows(ctx, span, how), span, follow, apart, c, t)
    # eligible [B, H, T]: tokens this reserve may take (windows still see the others' importance)
    new = torch.where(finite if eligible is None else finite & eligible, new, float("-inf"))
    cand = torch.cat([span_score[..., :n], new], dim=-1)  # held tokens first: they win ties
    order = cand.argsort(dim=-1, descending=True, stable=True)
    if spread:
        order = _in_rounds(order, cand, region, spread)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n + t, device=dev).expand_as(order).contiguous())
    keep = (rank < n) & torch.isfinite(cand)
    kept_old, chosen = keep[..., :n], keep[..., n:]
    # a chosen new token takes a place not kept (empty or lost), lowest index first, in token order
    freed = kept_old.long().argsort(dim=-1, stable=True)  # [B,H,n]: places not kept come first
    r = (chosen.long().cumsum(-1) - 1).clamp(min=0, max=max(n - 1, 0))
    dest = torch.where(chosen, freed.gather(-1, r), n)  # [B,H,T]
    score = torch.where(kept_old, span_score[..., :n], float("-inf"))
    score = torch.cat([score, span_score.new_full((b, h, 1), float("-inf"))], dim=-1)
    score.scatter_(-1, dest, torch.where(chosen, new, float("-inf")))
    score[..., n] = float("-inf")
    return chosen, torch.where(chosen, base + dest, scratch), score


def _in_rounds(order: torch.Tensor, score: torch.Tensor, region: torch.Tensor, spread: int) -> torch.Tensor:
    """`order` (every candidate, best score first) reordered in rounds: each region's first `spread`
    candidates in it, then each region's next `spread`, ...; within a round the better score first
    (ties: as `order` has them). Empty candidates (-inf) stay last."""
    by_region = order.gather(-1, region.gather(-1, order).argsort(dim=-1, stable=True))  # best first within
    r = region.gather(-1, by_region)
    idx = torch.arange(r.shape[-1], device=r.device).expand_as(r)
    start = torch.ones_like(r, dtype=torch.bool)
    start[..., 1:] = r[..., 1:] != r[..., :-1]
    first = torch.where(start, idx, 0).cummax(-1).values  # where each candidate's region begins
    rank = torch.empty_like(by_region).scatter_(-1, by_region, idx - first)  # its place within its region
    rounds = torch.where(torch.isfinite(score), rank // spread, r.shape[-1])
    return order.gather(-1, rounds.gather(-1, order).argsort(dim=-1, stable=True))


def scan_lengths(span: int) -> list[int]:
    """The window lengths "scan" compares: 2, 4, 8, ... up to `span` (and `span` itself)."""
    out, w = [], 2
    while w < span:
        out.append(w)
        w *= 2
    return [*out, span]


def _windows(ctx: torch.Tensor, span: int, how: str) -> torch.Tensor:
    """[B, H, W]: the score of the window of `span` tokens starting at each context token (-inf:
    not whole)."""
    windows = ctx.unfold(-1, span, 1)
    win = windows.sum(-1)
    if how == "peak":  # as important as its top token (a fact's rare name): a copied phrase around it adds nothing
        win = torch.where(torch.isfinite(win), windows.amax(-1), float("-inf"))
    win = _not_whole(win)
    if how in ("relative", "shared"):
        win = win / _finite_mean(win).clamp(min=1e-9)
    if how == "shared":
        win = win.amax(1, keepdim=True).expand_as(win)
    return win


def _scan_windows(ctx: torch.Tensor, mean: torch.Tensor, w: int) -> torch.Tensor:
    """A scan statistic: a window's importance above w times the context's mean token, over
    sqrt(w), so a short burst (a fact's rare name) and a long surprising passage compare on one
    scale (docs/retrieval.md, "A scan over window lengths")."""
    win = _not_whole(ctx.unfold(-1, w, 1).sum(-1))
    return (win - w * mean) / w ** 0.5


def _scan_or_joint(ctx: torch.Tensor, w: int, how: str) -> torch.Tensor:
    """[B, H, W]: "scan" windows of ctx [B, H, C]; "joint-scan": ctx [B, H, C, 2], the sum over
    the two signals of their scan windows over the signal's standard deviation in the context."""
    if how == "scan":
        return _scan_windows(ctx, _finite_mean(ctx), w)
    sig = ctx.movedim(-1, 0)  # [2, B, H, C]
    mean = _finite_mean(sig)
    spread = (_finite_mean(torch.where(torch.isfinite(sig), (sig - mean) ** 2, float("-inf"))) ** 0.5)
    return (_scan_windows(sig, mean, w) / spread.clamp(min=1e-6)).sum(0)


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    """[..., 1]: the mean of x's finite entries along the last dim (0 where there are none)."""
    whole = torch.isfinite(x)
    return torch.where(whole, x, 0.0).sum(-1, keepdim=True) / whole.sum(-1, keepdim=True).clamp(min=1)


def _not_whole(win: torch.Tensor) -> torch.Tensor:
    """Windows over a missing token (-inf; NaN where +inf met it) as -inf. Not nan_to_num, which
    turns -inf into the lowest finite float: such a window then counted in a write's mean, and
    with the empty context of a first write the relative scores came out ~1e8."""
    return torch.where(torch.isnan(win), float("-inf"), win)


def _token_scores(win: torch.Tensor, span: int, follow: int, apart: int, c: int, t: int) -> torch.Tensor:
    """[B, H, t]: each segment token's best window among those that keep it (starting span - 1 +
    follow tokens before it up to itself); c: context tokens before the segment."""
    b, h = win.shape[:2]
    if apart:  # non-maximum suppression: a passage keeps its best run, not all its overlapping ones
        rival = torch.nn.functional.max_pool1d(win.reshape(b * h, 1, -1), 2 * apart + 1, stride=1, padding=apart)
        win = torch.where(win >= rival.view_as(win), win, float("-inf"))
    reach = span + follow
    padded = torch.nn.functional.pad(win.reshape(b * h, 1, -1), (reach - 1, span - 1), value=float("-inf"))
    return torch.nn.functional.max_pool1d(padded, reach, stride=1).view(b, h, -1)[..., c : c + t]
