"""One MoBiLE decode step for 1..B sequences, written once (docs/design.md §1, §6): snapshot -> first pass -> read ->
fallback decision -> restore -> prefetch -> big pass -> accept.

A lone row's passes are single-sequence passes (compiled, all-resident, replayed from CUDA graphs), where its little
model's knobs and partial fallbacks apply; several rows share batched passes, where they are off. Rows that repair
earlier positions on a fallback (`--kv-repair`, `--rollback`) redo them alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mobile_moe.engine.passes import BIG, PassSpec
from mobile_moe.engine.runner import row_log, row_weights
from mobile_moe.layers.kv_cache import BatchKV, SequenceSnapshot
from mobile_moe.layers.moe import ExpertMode, Routing

if TYPE_CHECKING:
    from mobile_moe.engine.generate import Decoder
    from mobile_moe.engine.runner import Runner

Read = tuple[int, int, float | None, tuple[float, ...]]  # (token, greedy token, confidence or None, signals) of one pass
Batcher = Callable[[list["Decoder"]], BatchKV]  # the rows' sequences as one batched pass sees them


@dataclass(frozen=True)
class StepRow:
    """A sequence taking the step: its decoder, the step's input token and the step's number (1, 2, ...)."""

    dec: Decoder
    token: int
    step: int


@dataclass
class Fallback:
    """A row the policy sends back to big: what its first pass read, and where its big pass starts and how far back."""

    row: StepRow
    read: Read | None  # None: no first pass ran (an exact row verifying its full draft)
    routing: torch.Tensor | None  # [L, k] the little pass's top-k of each MoE layer, for the prefetch (None: nothing to prefetch)
    repair: int = 0  # earlier positions redone with it (their KV entries little wrote)
    first_layer: int = 0  # the decoder layer it starts at (a partial fallback), else 0
    ids: torch.Tensor | None = None  # a lone row's first-pass input, rerun as is


def decode_step(runner: Runner, rows: list[StepRow], batch: Batcher | None = None, little_first: bool = True) -> list[int]:
    """Each row's token of this step. little_first False: mobile rows run big at once (a batch where little does not pay).
    An exact row whose draft is full drafts nothing: big verifies its draft at once (`verify`), as it does an open draft
    when this step runs big first."""
    full = [r.dec.policy.verifies and r.dec.little_positions >= (r.dec.policy.draft_max if little_first else 1) for r in rows]
    if any(full):
        return verify(runner, rows, full, batch, little_first)
    firsts = [r.dec.first if little_first or not r.dec.policy.may_fall_back else r.dec.fallback for r in rows]
    mobile = [r.dec.policy.may_fall_back and s.mode is ExpertMode.LITTLE for r, s in zip(rows, firsts)]
    for r, m in zip(rows, mobile):
        r.dec.result.stats.big_instead_tokens += r.dec.policy.may_fall_back and not m
    befores = [r.dec.kv.snapshot() if m else None for r, m in zip(rows, mobile)]
    ids, reads, routing = first_pass(runner, rows, firsts, mobile, batch)
    falls = [i for i, (r, m, read) in enumerate(zip(rows, mobile, reads)) if m and r.dec.policy.falls_back(1.0 if read[2] is None else read[2], r.step)]
    for i, (r, read) in enumerate(zip(rows, reads)):
        if i not in falls:
            r.dec.accept(read[0], read[0], read[2], read[3], fell_back=False, little_pass=firsts[i].mode is ExpertMode.LITTLE)
    tokens = [read[0] for read in reads]
    drafted = [m and i not in falls and rows[i].dec.policy.verifies for i, m in enumerate(mobile)]
    if any(drafted):  # exact rows only: a mobile step never enters it
        prefetch_drafts(runner, rows, drafted, routing)
    if falls:
        logs = [runner.routing_buf] if routing is None else [row_log(routing, i) for i in falls]  # before any other pass
        backs = [Fallback(rows[i], reads[i], log, ids=ids) for i, log in zip(falls, logs)]
        for i, token in zip(falls, fall_back(runner, backs, befores=[befores[i] for i in falls], lone=len(rows) == 1, batch=batch)):
            tokens[i] = token
    return tokens


def prefetch_drafts(runner: Runner, rows: list[StepRow], drafted: list[bool], routing: dict[int, Routing] | None) -> None:
    """Exact rows whose little pass just drafted a token: start loading the other-half experts big's verify will need at
    that position (as a fallback prefetches them), each position its share of the cache so a full draft's loads fit."""
    if routing is None and len(rows) > 1:
        return  # a batched pass that recorded no routing
    for i, (row, kept) in enumerate(zip(rows, drafted)):
        dec = row.dec
        if kept and dec.policy.config.prefetch_on_fallback:
            assert dec.first.little_k is not None
            runner.prefetch_other_half(runner.routing_buf if routing is None else row_log(routing, i), dec.first.little_k, share=dec.policy.draft_max)


def verify(runner: Runner, rows: list[StepRow], full: list[bool], batch: Batcher | None, little_first: bool) -> list[int]:
    """A step where exact rows with a full draft verify it: each such row's big pass over its drafted positions and this
    step's input keeps the longest agreeing prefix and emits big's token after it (a bonus token when all agree); the
    other rows take the step as usual."""
    backs = [Fallback(r, None, None) for r, f in zip(rows, full) if f]
    tokens = dict(zip((id(b.row) for b in backs), fall_back(runner, backs, [None] * len(backs), len(rows) == 1, batch)))  # no pass to undo
    rest = [r for r, f in zip(rows, full) if not f]
    if rest:
        tokens.update(zip((id(r) for r in rest), decode_step(runner, rest, batch, little_first)))
    return [tokens[id(r)] for r in rows]


def verify_tail(runner: Runner, dec: Decoder) -> int | None:
    """Exact mode when a request would end: big checks the drafted tokens it has not verified yet, in one pass; returns
    its token at the first disagreement (the tokens from there are taken back and the request goes on from it), or None
    when every drafted token is big's own."""
    n, result = dec.little_positions, dec.result
    if n == 0:
        return None
    dec.kv.rewind(n)  # the drafts' inputs: the last verified token and every drafted one but the newest
    logits = runner.forward(runner.ids(result.token_ids[-(n + 1) : -1]), dec.kv, dec.fallback, all_logits=True)  # [n, V]
    if dec.speculative:
        wrong, token = dec.verify_draft(logits, n)
    else:
        big = [int(v) for v in runner.cache.transfer.to_host(logits.argmax(-1).double())]
        wrong = next((i for i, (b, t) in enumerate(zip(big, result.token_ids[-n:])) if b != t), None)
        token = -1 if wrong is None else big[wrong]
    dec.little_positions = 0
    if wrong is None:
        return None
    taken = n - wrong  # the first wrong token and every later one
    dec.kv.rewind(taken - 1)  # the positions of the inputs after the wrong token's
    return dec.take_back(taken, token)


def first_pass(
    runner: Runner, rows: list[StepRow], specs: list[PassSpec], mobile: list[bool], batch: Batcher | None
) -> tuple[torch.Tensor | None, list[Read], dict[int, Routing] | None]:
    """Every row's first pass and its read (one host sync): a lone row's single-sequence pass (its input kept on the device,
    its layer inputs kept for a partial fallback), else one batched pass. Returns (a lone row's input ids, the reads, a
    batched pass's routing of every row when it recorded)."""
    if len(rows) == 1:
        row, spec = rows[0], specs[0]
        dec = row.dec
        ids = dec.input_ids(row.token)
        keep = dec.partial.input_row(dec.kv.length) if dec.partial is not None and spec.mode is ExpertMode.LITTLE else None
        logits = runner.forward(ids, dec.kv, spec, step=row.step, keep=keep)
        return ids, [dec.read(logits, mobile[0] and dec.policy.needs_confidence)], None
    assert batch is not None, "several rows need their batch"
    decs = [r.dec for r in rows]
    routing: dict[int, Routing] | None = {} if any(s.record for s in specs) else None
    logits = runner.forward_rows(runner.ids([r.token for r in rows]), batch(decs), specs, routing)  # [B, V]
    return None, read_rows(runner, decs, logits, [m and d.policy.needs_confidence for d, m in zip(decs, mobile)], routing), routing


def fall_back(runner: Runner, backs: list[Fallback], befores: list[SequenceSnapshot | None], lone: bool, batch: Batcher | None) -> list[int]:
    """Redo this step with big for exactly these rows (KV and recurrent states back to before it, the other-half experts
    prefetched): rows with nothing to repair together, a lone row or a repairing one alone; each row's step recorded."""
    for back, before in zip(backs, befores):
        prepare(runner, back, before)
    together = [] if lone else [b for b in backs if b.repair == 0]
    tokens: dict[int, int] = {}
    if together:
        decs = [b.row.dec for b in together]
        logits = runner.forward_rows(runner.ids([b.row.token for b in together]), batch(decs), [BIG] * len(decs))  # type: ignore[misc]
        for b, read in zip(together, read_rows(runner, decs, logits, [False] * len(decs), None)):
            tokens[id(b)] = read[0]
    checked = set()  # rows whose repair also checked little's tokens: that check records their step
    for b in backs:
        if id(b) not in tokens:
            tokens[id(b)], was_checked = big_alone(runner, b, lone)
            if was_checked:
                checked.add(id(b))
    for b in backs:
        if id(b) not in checked:
            _, greedy, conf, signals = b.read or (tokens[id(b)], tokens[id(b)], None, ())
            b.row.dec.accept(tokens[id(b)], greedy, conf, signals, fell_back=True, little_pass=False)
    return [tokens[id(b)] for b in backs]


def prepare(runner: Runner, back: Fallback, before: SequenceSnapshot | None) -> None:
    """Put the row's sequence back to before the step (before None: no first pass ran this step) and `repair` positions
    further, and prefetch what big will add."""
    dec = back.row.dec
    back.repair = 0 if dec.kv.recurrent else min(dec.policy.config.kv_repair or 0, dec.little_positions)
    back.first_layer = dec.partial.resume_layer(back.repair) if dec.partial is not None else 0  # 0: a full big pass
    if before is not None:
        dec.kv.restore(before)  # forget this step: KV length back, recurrent states copied back
    dec.kv.rewind(back.repair)
    if dec.policy.config.prefetch_on_fallback and back.routing is not None:
        assert dec.first.little_k is not None  # resolved when the decoder was made
        runner.prefetch_other_half(back.routing, dec.first.little_k, back.first_layer)


def big_alone(runner: Runner, back: Fallback, lone: bool) -> tuple[int, bool]:
    """One row's big pass on its own: this step (a lone row keeps its knobs and may resume a partial fallback), with the
    repaired positions before it; with rollback, little's tokens there are checked. Returns (its token, whether checked)."""
    dec, row, n = back.row.dec, back.row, back.repair
    spec = dec.fallback if lone else BIG
    ids = runner.ids(dec.result.token_ids[-(1 + n) :]) if n else (back.ids if back.ids is not None else runner.ids([row.token]))
    resume = None if dec.partial is None else dec.partial.resumed_inputs(back.first_layer, dec.kv.length, n + 1)
    _, greedy, conf, signals = back.read or (-1, None, None, ())  # no first pass: nothing of its own to record
    if n and dec.rollback:
        logits = runner.forward(ids, dec.kv, spec, all_logits=True, step=row.step, resume=resume)
        return dec.check_repaired(logits, n, greedy, conf, signals), True
    return dec.read(runner.forward(ids, dec.kv, spec, step=row.step, resume=resume), with_confidence=False)[0], False


def read_rows(runner: Runner, decs: list[Decoder], logits: torch.Tensor, confidence: list[bool], routing: dict[int, Routing] | None) -> list[Read]:
    """Each row's read from logits [B, V], in one host sync for the batch (greedy rows that need no confidence share one argmax)."""
    greedy = [b for b, (d, conf) in enumerate(zip(decs, confidence)) if not conf and d.sampling.temperature == 0.0 and d.processor is None]
    plain = set(greedy)
    others = [b for b in range(len(decs)) if b not in plain]
    parts = [] if not greedy else [(logits if len(greedy) == len(decs) else logits[greedy]).argmax(-1).double()]  # [G]
    sizes = []
    for b in others:
        row_parts = decs[b].read_parts(logits[b], confidence[b], lambda b=b: row_weights(routing, b))
        parts += row_parts
        sizes.append(sum(p.numel() for p in row_parts))
    values = runner.cache.transfer.to_host(torch.cat(parts))
    out: list = [None] * len(decs)
    for b, value in zip(greedy, values):
        out[b] = (int(value), int(value), None, ())
    start = len(greedy)
    for b, size in zip(others, sizes):
        out[b] = decs[b].parse(values[start : start + size], confidence[b])
        start += size
    return out
