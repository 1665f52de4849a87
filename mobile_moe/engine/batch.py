"""Continuous batching (docs/design.md §1 at batch B, §6): rows join and leave between steps; each step prefills one prompt
chunk of a joining row, then decodes every decoding row in one batched pass, with MoBiLE decided per row.

A step's first pass runs each row with its policy's experts (little for little and mobile rows, big for big rows,
mixed in one pass). Mobile rows below tau are then recomputed with big as a sub-batch of exactly those rows, each
row's KV length or recurrent state restored to before the step, the other-half experts of those rows prefetched.
A lone decoding row takes the single-sequence step, so one request alone runs exactly as `generate` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from mobile_moe.config import SamplingParams
from mobile_moe.engine.budget import PREFILL_CHUNK
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
    rolls_back,
    stream_for,
)
from mobile_moe.engine.passes import BIG
from mobile_moe.engine.runner import Runner
from mobile_moe.errors import InvalidParameter
from mobile_moe.layers.kv_cache import BatchKV, SequenceSnapshot
from mobile_moe.layers.moe import ExpertMode
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
        self.pool = runner.new_pool(max_rows, max_len)
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
        slot = self.free.pop(0)
        kv = self.pool.row(slot, self.runner.new_recurrent())
        dec = new_decoder(self.runner, kv, prompt, sampling, policy)
        dec.rollback = rolls_back(policy, sampling, kv)
        enable_partial(dec)  # its lone-row steps (`Decoder.step`); batched fallbacks run every layer
        row = Row(slot, list(prompt), dec, stream_for(dec, on_token), tag)
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
        row.result.steps.append(StepRecord(token, None, False, token))
        row.prefilled_at = Counters.now(self.runner)
        row.decode_start = time.perf_counter()
        self._emit(row, token)
        return len(chunk)

    def _decode(self, rows: list[Row]) -> None:
        """One token of each decoding row: the single-sequence step for a lone row, else a batched step."""
        if len(rows) == 1:
            row = rows[0]
            row.steps += 1
            self._emit(row, row.dec.step(row.token, row.steps))
            return
        mobile = any(r.policy.may_fall_back for r in rows)
        little_first = self.governor.little_pays(len(rows)) if mobile else True
        start = time.perf_counter()
        tokens = self._decode_batch(rows, little_first)
        if mobile:
            self.governor.observe(len(rows), little_first, time.perf_counter() - start)
        self.batched_steps += 1
        self.row_steps += len(rows)
        for row, token in zip(rows, tokens):
            self._emit(row, token)

    def _decode_batch(self, rows: list[Row], little_first: bool) -> list[int]:
        """The batched step: first pass for all rows, then big for the mobile rows below tau -> each row's token."""
        runner = self.runner
        little = [r.policy.decode_mode is ExpertMode.LITTLE and (little_first or not r.policy.may_fall_back) for r in rows]
        mobile = [r.policy.may_fall_back and first for r, first in zip(rows, little)]
        befores = [r.dec.kv.snapshot() if m else None for r, m in zip(rows, mobile)]
        for r, m in zip(rows, mobile):
            r.steps += 1
            r.result.stats.big_instead_tokens += r.policy.may_fall_back and not m
        specs = [replace(r.dec.first, record=m) if first else BIG for r, first, m in zip(rows, little, mobile)]
        logits = runner.forward_rows(runner.ids([r.token for r in rows]), self._batch(rows), specs)  # [B, V]
        reads = self._read(rows, logits, [m and r.policy.needs_confidence for r, m in zip(rows, mobile)])
        falls = [i for i, (r, m) in enumerate(zip(rows, mobile)) if m and r.policy.falls_back(1.0 if reads[i][2] is None else reads[i][2], r.steps)]
        tokens = [read[0] for read in reads]
        for i, (r, read) in enumerate(zip(rows, reads)):
            if i not in falls:
                r.dec.accept(read[0], read[0], read[2], read[3], fell_back=False, little_pass=little[i])
        if falls:
            logs = [runner.row_log(i) for i in falls]
            for i, token in zip(falls, self._fall_back([rows[i] for i in falls], [befores[i] for i in falls], logs, [reads[i] for i in falls])):
                tokens[i] = token
        return tokens

    def _fall_back(
        self,
        rows: list[Row],
        befores: list[SequenceSnapshot | None],
        logs: list[dict[int, torch.Tensor]],
        reads: list[tuple[int, int, float | None, tuple[float, ...]]],
    ) -> list[int]:
        """Redo this step with big for exactly these rows (KV and recurrent states back to before it); each row's step is
        recorded (`reads`: its first pass's token, greedy token, confidence and signals) -> their tokens."""
        runner = self.runner
        repairs = []
        for row, before, log in zip(rows, befores, logs):
            assert before is not None
            row.dec.kv.restore(before)
            repairs.append(0 if row.dec.kv.recurrent else min(row.policy.config.kv_repair or 0, row.dec.little_positions))
            if row.policy.config.prefetch_on_fallback:
                runner.prefetch_other_half(log, runner.little_k_of(row.dec.first.little_k))
        tokens: dict[int, int] = {}
        together = [i for i, n in enumerate(repairs) if n == 0]
        if together:
            sub = [rows[i] for i in together]
            logits = runner.forward_rows(runner.ids([r.token for r in sub]), self._batch(sub), [BIG] * len(sub))
            for i, read in zip(together, self._read(sub, logits, [False] * len(sub))):
                tokens[i] = read[0]
        checked = set()  # rows whose repair also checked little's tokens: that check records their step
        for i, n in enumerate(repairs):
            if n:  # earlier little positions redone too: that row alone, several tokens
                row, (_, greedy, conf, signals) = rows[i], reads[i]
                row.dec.kv.rewind(n)
                ids = runner.ids(row.result.token_ids[-(1 + n) :])
                if row.dec.rollback:
                    tokens[i] = row.dec.check_repaired(runner.forward(ids, row.dec.kv, BIG, all_logits=True), n, greedy, conf, signals)
                    checked.add(i)
                else:
                    tokens[i] = row.dec.read(runner.forward(ids, row.dec.kv, BIG), with_confidence=False)[0]
        for i, (_, greedy, conf, signals) in enumerate(reads):
            if i not in checked:
                rows[i].dec.accept(tokens[i], greedy, conf, signals, fell_back=True, little_pass=False)
        return [tokens[i] for i in range(len(rows))]

    def _read(self, rows: list[Row], logits: torch.Tensor, confidence: list[bool]) -> list[tuple[int, int, float | None, tuple[float, ...]]]:
        """Each row's (token, greedy token, confidence, signals) from logits [B, V], in one host sync for the batch
        (greedy rows that need no confidence share one argmax)."""
        greedy = [b for b, (r, conf) in enumerate(zip(rows, confidence)) if not conf and r.dec.sampling.temperature == 0.0]
        plain = set(greedy)
        others = [b for b in range(len(rows)) if b not in plain]
        parts = [] if not greedy else [(logits if len(greedy) == len(rows) else logits[greedy]).argmax(-1).double()]  # [G]
        sizes = []
        for b in others:
            row_parts = rows[b].dec.read_parts(logits[b], confidence[b], lambda b=b: self.runner.row_weights(b))
            parts += row_parts
            sizes.append(sum(p.numel() for p in row_parts))
        values = self.runner.cache.transfer.to_host(torch.cat(parts))
        out: list = [None] * len(rows)
        for b, value in zip(greedy, values):
            out[b] = (int(value), int(value), None, ())
        start = len(greedy)
        for b, size in zip(others, sizes):
            out[b] = rows[b].dec.parse(values[start : start + size], confidence[b])
            start += size
        return out

    def _batch(self, rows: list[Row]) -> BatchKV:
        """The rows' sequences as one batched pass sees them."""
        return BatchKV(self.pool, [r.slot for r in rows], [r.dec.kv for r in rows], self.runner.ids)

    def _emit(self, row: Row, token: int) -> None:
        """Hand out a row's new token; the row finishes at EOS, its token limit, or when its callback says stop."""
        row.token = token
        if not emit(row.result, token, row.dec.sampling, self.eos) or not row.stream.send(row.result):
            self._finish(row)

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
        self.free.append(row.slot)
        self.free.sort()  # the lowest free slots first: rows stay adjacent in the pool, so a batch reads them as a view
