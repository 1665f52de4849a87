"""Preallocated per-layer key/value cache with rewind (MoBiLE drops a step's entries on fallback)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for one sequence: per layer [heads, max_len, dim] tensors and a shared length."""

    def __init__(
        self,
        k_shapes: list[tuple[int, int]],
        v_shapes: list[tuple[int, int]],
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.max_len = max_len
        self.k = [torch.zeros(h, max_len, d, device=device, dtype=dtype) for h, d in k_shapes]
        self.v = [torch.zeros(h, max_len, d, device=device, dtype=dtype) for h, d in v_shapes]
        self.length = 0

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [H, T, D] entries at the current length; return the layer's keys/values up to length + T."""
        end = self.length + k_new.shape[1]
        if end > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} positions, step needs {end}")
        self.k[layer][:, self.length : end] = k_new
        self.v[layer][:, self.length : end] = v_new
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        """Commit n positions written by the last forward pass."""
        self.length += n

    def rewind(self, n: int) -> None:
        """Forget the last n positions; the next pass overwrites them."""
        if n > self.length:
            raise ValueError(f"cannot rewind {n} positions from length {self.length}")
        self.length -= n
