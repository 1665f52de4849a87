"""Continuous batching (docs/design.md §1 at batch B, §6): rows join and leave between steps; each step prefills one prompt
chunk of a joining row, then decodes every decoding row in one batched pass, with MoBiLE decided per row.

The step itself is `engine/step.py`'s, the one `generate` takes: its first pass runs each row with its policy's experts
(little for little and mobile rows, big for big rows, mixed in one pass); mobile rows below tau are then recomputed with
big as a sub-batch of exactly those rows. A lone decoding row's passes are single-sequence passes, so one request alone
runs exactly as `generate` does. Here: admission, prompt chunks, the little-or-big governor, and handing tokens out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mobile_moe.config import SamplingParams
from mobile_moe.engine.generate import (
    Counters,
    Decoder,
    GenerationResult,
    StepRecord,
    Stream,
    TokenCallback,
    emit,
    enable_partial,
    fill_counters,
    new_decoder,
    prompt_boundary,
    rolls_back,
    stream_for,
)
from mobile_moe.engine.prefix import Writer, held_prefix, prefill_writer
from mobile_moe.engine.runner import Runner
from mobile_moe.engine.step import Batcher, StepRow, decode_step, verify_tail
from mobile_moe.errors import InvalidParameter
from mobile_moe.layers.kv_cache import BatchKV, SequenceSnapshot
from mobile_moe.loading.budget import PREFILL_CHUNK
from mobile_moe.policy.governor import LittleGovernor
from mobile_moe.policy.policies import Policy


@dataclass
class Row:
    """One sequence in the batch: its request, decoder state, pool slot and progress."""

    slot: int
    prompt: list[int]
    dec: Decoder
    stream: Stream  # hands the row's tokens to its callback once no rollback can take them back
    tag: object = None  # the caller's handle (the server's job)
    prefilled: int = 0  # prompt tokens already through the model
    token: int = -1  # the last emitted token: the next step's input
    steps: int = 0  # decode steps taken
    done: bool = False
    joined_at: float = field(default_factory=time.perf_counter)
    decode_start: float = 0.0
    joined: Counters | None = None  # the engine's counters when the row joined
    prefilled_at: Counters | None = None  # and when its prompt was through
    writer: Writer = None  # who writes its prompt positions (engine/prefix.py)
    boundary: SequenceSnapshot | None = None  # its recurrent states right after the prompt, for a later request to resume from

    @property
    def policy(self) -> Policy:
        """The row's policy."""
        return self.dec.policy

    @property
    def result(self) -> GenerationResult:
        """What the row generated so far."""
        return self.dec.result

    @property
    def decoding(self) -> bool:
        """Whether the prompt is through and the row decodes."""
        return self.prefilled == len(self.prompt) and not self.done


class BatchDecoder:
    """Up to `max_rows` sequences decoded together over one runner; `step` advances all of them by one token."""

    def __init__(self, runner: Runner, max_rows: int, max_len: int, eos: tuple[int, ...], governor: LittleGovernor | None = None) -> None:
        if max_rows < 1:
            raise InvalidParameter(f"max batch must be >= 1, got {max_rows}")
        self.runner, self.eos, self.max_rows = runner, eos, max_rows
        self.pool = runner.decode_pool(max_rows, max_len, self)  # held by the runner across batches, reset row by row
        self.free = list(range(max_rows))
        self.rows: list[Row] = []  # in joining order
        self.governor = governor or LittleGovernor()
        self.batched_steps = 0  # steps that decoded 2+ rows in one pass
        self.row_steps = 0  # row-tokens decoded in those steps

    @property
    def room(self) -> int:
        """Rows that can join now."""
        return len(self.free)

    def add(self, prompt: list[int], sampling: SamplingParams, policy: Policy, on_token: TokenCallback | None = None, tag: object = None) -> Row:
        """Admit a request (its prompt is prefilled by the coming steps); raises when the batch is full."""
        if not self.free:
            raise InvalidParameter(f"the batch is full ({self.max_rows} rows)")
        if len(prompt) + sampling.max_new_tokens > self.pool.max_len:
            raise InvalidParameter(f"{len(prompt)} prompt + {sampling.max_new_tokens} new tokens exceed the {self.pool.max_len}-token rows")
        writer = prefill_writer(policy, self.runner.little_k_of(policy.config.little_k))
        slot, kv, reused = self.runner.pool_row(self.pool, self.free, prompt, writer)  # the free row holding the longest reusable prefix
        self.free.remove(slot)
        dec = new_decoder(self.runner, kv, prompt, sampling, policy)
        dec.rollback = rolls_back(policy, sampling, kv)
        enable_partial(dec)  # its lone-row steps (`step.decode_step` with one row); batched fallbacks run every layer
        row = Row(slot, list(prompt), dec, stream_for(dec, on_token), tag, writer=writer, prefilled=reused)
        row.result.stats.reused_tokens, row.result.stats.prefix_hits = reused, int(reused > 0)
        row.joined = Counters.now(self.runner)
        self.rows.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop a row now (its client went away); it leaves with finish_reason "cancelled"."""
        if not row.done:
            row.result.finish_reason = "cancelled"
            self._finish(row)

    def step(self) -> list[Row]:
        """Up to PREFILL_CHUNK prompt tokens of joining rows (oldest first), then one token of every decoding row; the
        rows that finished. A long prompt thus joins over several steps while the other rows go on decoding."""
        before = [r for r in self.rows if not r.done]
        decoding = [r for r in before if r.decoding]
        budget = PREFILL_CHUNK
        for row in (r for r in before if not r.decoding):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(row, budget)
        if decoding:
            self._decode(decoding)
        finished = [r for r in before if r.done]
        self.rows = [r for r in self.rows if not r.done]
        return finished

    def _prefill_chunk(self, row: Row, budget: int) -> int:
        """Up to `budget` prompt tokens of a joining row (at the prompt's end, its first token); the tokens it took."""
        start = time.perf_counter()
        chunk = row.prompt[row.prefilled : row.prefilled + budget]
        logits = self.runner.forward(self.runner.ids(chunk), row.dec.kv, row.dec.first.with_mode(row.policy.prefill_mode))
        row.prefilled += len(chunk)
        if row.prefilled < len(row.prompt):
            row.result.stats.prefill_s += time.perf_counter() - start
            return len(chunk)
        token, _, _, _ = row.dec.read(logits, with_confidence=False)
        row.result.stats.prefill_s += time.perf_counter() - start
        row.boundary = prompt_boundary(self.runner, row.dec.kv)
        row.result.steps.append(StepRecord(token, None, False, token))
        row.prefilled_at = Counters.now(self.runner)
        row.decode_start = time.perf_counter()
        self._emit(row, token)
        return len(chunk)

    def _decode(self, rows: list[Row]) -> None:
        """One token of each decoding row: one step for them all (a lone row's passes are single-sequence passes)."""
        for row in rows:
            row.steps += 1
        step_rows = [StepRow(r.dec, r.token, r.steps) for r in rows]
        if len(rows) == 1:
            self._emit(rows[0], decode_step(self.runner, step_rows)[0])
            return
        mobile = any(r.policy.may_fall_back for r in rows)
        little_first = self.governor.little_pays(len(rows)) if mobile else True
        start = time.perf_counter()
        tokens = decode_step(self.runner, step_rows, self._batcher(rows), little_first)
        if mobile:
            self.governor.observe(len(rows), little_first, time.perf_counter() - start)
        self.batched_steps += 1
        self.row_steps += len(rows)
        for row, token in zip(rows, tokens):
            self._emit(row, token)

    def _batcher(self, rows: list[Row]) -> Batcher:
        """The rows' sequences (any of them) as one batched pass sees them."""
        slot_of = {id(r.dec): r.slot for r in rows}
        return lambda decs: BatchKV(self.pool, [slot_of[id(d)] for d in decs], [d.kv for d in decs], self.runner.ids)

    def _emit(self, row: Row, token: int) -> None:
        """Hand out a row's new token; the row finishes at EOS, its token limit, or when its callback says stop."""
        row.token = token
        if not emit(row.result, token, row.dec.sampling, self.eos, row.dec.processor) or not row.stream.send(row.result):
            late = verify_tail(self.runner, row.dec) if row.policy.verifies and row.result.finish_reason != "cancelled" else None
            if late is None:
                self._finish(row)
                return
            row.result.finish_reason = "length"  # big took back drafted tokens: the row goes on from its own
            self._emit(row, late)

    def _finish(self, row: Row) -> None:
        """Fill the row's counters (cache counters are the batch's, shared with the rows beside it) and free its slot."""
        row.done = True
        row.stream.finish(row.result)
        stats = row.result.stats
        stats.tokens = len(row.result.token_ids)
        if row.decode_start:
            stats.decode_s = time.perf_counter() - row.decode_start
        assert row.joined is not None
        fill_counters(stats, self.runner, row.joined, row.prefilled_at or row.joined)
        self.runner.remember(row.dec.kv, held_prefix(row.prompt, row.result.steps, row.dec.kv, row.writer, row.policy, row.boundary), self.pool, row.slot)
        self.free.append(row.slot)
        self.free.sort()  # the lowest free slots first: rows stay adjacent in the pool, so a batch reads them as a view
