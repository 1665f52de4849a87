"""Batched computation of routed experts out of the device cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mobile_moe.experts.cache import ExpertCache

# Token-expert pairs up to which the gathered-weights bmm path is used (decode); above it, loop over experts.
BATCHED_PAIRS_MAX = 64


class ExpertExecutor:
    """Runs a layer's chosen experts: resident first (via the cache), then a few batched kernels."""

    def __init__(self, cache: ExpertCache, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.cache = cache
        self.act = act

    def run(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], indices/weights: [T, n] -> sum_j weights[:, j] * expert_{indices[:, j]}(x)  [T, H]."""
        unique_t, inverse = indices.unique(return_inverse=True)
        unique = unique_t.tolist()  # the one host sync per layer: which experts to bring
        if indices.numel() <= BATCHED_PAIRS_MAX and len(unique) <= self.cache.num_slots:
            return self._run_pairs(layer, x, indices, weights, unique, inverse)
        return self._run_grouped(layer, x, indices, weights, unique)

    def _run_pairs(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, unique: list[int], inverse: torch.Tensor) -> torch.Tensor:
        """Gather each (token, expert) pair's weights and compute all pairs in two bmm calls."""
        slots = self.cache.acquire(layer, unique)
        try:
            pair_slots = torch.tensor(slots, device=x.device)[inverse.flatten()]  # [P]
            tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])  # [P]
            xs = x[tokens].unsqueeze(-1)  # [P, H, 1]
            gate_up = torch.bmm(self.cache.gate_up[pair_slots], xs).squeeze(-1)  # [P, 2I]
            gate, up = gate_up.chunk(2, dim=-1)
            h = (self.act(gate) * up).unsqueeze(-1)  # [P, I, 1]
            y = torch.bmm(self.cache.down[pair_slots], h).squeeze(-1)  # [P, H]
            y = y * weights.flatten().to(y.dtype)[:, None]
            return torch.zeros_like(x).index_add_(0, tokens, y)
        finally:
            self.cache.release(slots)

    def _run_grouped(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, unique: list[int]) -> torch.Tensor:
        """Prefill: experts in groups that fit the cache, each expert on the tokens routed to it."""
        out = torch.zeros_like(x)
        group = max(1, self.cache.num_slots)
        for start in range(0, len(unique), group):
            experts = unique[start : start + group]
            slots = self.cache.acquire(layer, experts)
            try:
                for expert, slot in zip(experts, slots):
                    token, pos = torch.where(indices == expert)
                    gate, up = torch.nn.functional.linear(x[token], self.cache.gate_up[slot]).chunk(2, dim=-1)
                    y = torch.nn.functional.linear(self.act(gate) * up, self.cache.down[slot])
                    out.index_add_(0, token, y * weights[token, pos, None].to(y.dtype))
            finally:
                self.cache.release(slots)
        return out
