"""Attention modules: grouped-query attention (Mixtral, Qwen, OLMoE) and multi-head latent attention (DeepSeek)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mobile_moe.layers.fused import FusedLinear, fuse_linears
from mobile_moe.layers.kv_cache import LayerBatchKV, LayerKV
from mobile_moe.layers.norm import RMSNorm
from mobile_moe.layers.rotary import RopeLayout, apply_rotary


@dataclass(frozen=True)
class AttentionInput:
    """What every attention layer of one forward pass shares."""

    cos: torch.Tensor  # [T, rot/2] in the compute dtype (cast once per pass, not per layer)
    sin: torch.Tensor  # [T, rot/2]
    mask: torch.Tensor | None  # [T, S] bool (True = attend), None when T == 1
    cos_fp32: torch.Tensor | None = None  # [T, rot/2] float32, for layers that rotate in float32 (None: cos is float32)
    sin_fp32: torch.Tensor | None = None

    @staticmethod
    def of(cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> AttentionInput:
        """From float32 rotary tables: cast once to the compute dtype, keeping the float32 tables where they differ."""
        if dtype == cos.dtype:
            return AttentionInput(cos, sin, mask)
        return AttentionInput(cos.to(dtype), sin.to(dtype), mask, cos, sin)

    def row(self, i: int) -> AttentionInput:
        """Token i's input alone (a batched decode pass: one token per row)."""
        pick = lambda t: None if t is None else t[i : i + 1]  # noqa: E731
        return AttentionInput(self.cos[i : i + 1], self.sin[i : i + 1], None, pick(self.cos_fp32), pick(self.sin_fp32))

    def tables(self, fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) in float32 (fp32) or the compute dtype."""
        if fp32 and self.cos_fp32 is not None and self.sin_fp32 is not None:
            return self.cos_fp32, self.sin_fp32
        return self.cos, self.sin


def causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """[T, start+T] boolean mask letting query i see keys 0..start+i; None for a single query."""
    if length == 1:
        return None
    q_pos = torch.arange(start, start + length, device=device)
    k_pos = torch.arange(start + length, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q: [Hq, T, D], k/v: [Hkv, S, D*] -> [T, Hq * Dv]."""
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=k.shape[0] != q.shape[0])  # [1, Hq, T, Dv]
    return out[0].transpose(0, 1).reshape(q.shape[1], -1)


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """`attend` with a learned logit per head in each softmax denominator (gpt-oss): one extra zero key/value
    whose logit is sinks[h]. q: [Hq, T, D], k/v: [Hkv, S, D*], sinks: [Hq] -> [T, Hq * Dv]."""
    (Hq, T, _), S = q.shape, k.shape[1]
    k = torch.cat((k, k.new_zeros(k.shape[0], 1, k.shape[2])), dim=1)  # [Hkv, S+1, D]
    v = torch.cat((v, v.new_zeros(v.shape[0], 1, v.shape[2])), dim=1)
    keys = q.new_zeros(Hq, T, S) if mask is None else q.new_zeros(T, S).masked_fill(~mask, float("-inf")).expand(Hq, T, S)
    sink = sinks.to(q.dtype)[:, None, None].expand(Hq, T, 1)
    bias = torch.cat((keys, sink), dim=-1)  # [Hq, T, S+1] additive logits: 0 (attend), -inf (masked), sinks[h] for the extra key
    return attend(q, k, v, bias, scale)


QKNorm = Literal["none", "head", "full"]


class GQAAttention(nn.Module):
    """Rotary grouped-query attention with optional q/k RMSNorm (per head or over the full width), clipping and partial rotary."""

    batches_rows = True  # attends a batch of decode rows (`LayerBatchKV`) in one call

    def __init__(  # noqa: PLR0913 - the architecture's attention settings, most by keyword
        self,
        layer: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: QKNorm,
        eps: float,
        clip_qkv: float | None,
        rotary_dim: int | None = None,
        rope_layout: RopeLayout = "half",
        rope_fp32: bool = False,
        output_gate: bool = False,
        sinks: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim  # leading channels rotated, the rest pass through
        self.rope_layout, self.rope_fp32 = rope_layout, rope_fp32  # rope_fp32: rotate in float32, round once (ERNIE-4.5)
        self.output_gate = output_gate  # q_proj also yields a per-head gate; out *= sigmoid(gate) before o_proj (Qwen3.5)
        self.q_proj = nn.Linear(hidden, heads * head_dim * (2 if output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(heads * head_dim, eps), RMSNorm(kv_heads * head_dim, eps)
        self.clip_qkv = clip_qkv
        self.sinks = nn.Parameter(torch.empty(heads)) if sinks else None  # [H] softmax sink logits (gpt-oss)
        self.sliding_window = sliding_window  # attend to this many latest positions (gpt-oss sliding layers)
        self.qkv: FusedLinear | None = None

    def fuse_projections(self, column_major: bool = False) -> None:
        """Compute q, k and v with one matmul from now on (weights must be final: loaded and placed)."""
        self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj], column_major)

    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, dim) of the cached keys and values."""
        return (self.kv_heads, self.head_dim), (self.kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, inp: AttentionInput, kv: LayerKV | LayerBatchKV) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; writes this step's keys/values into the layer's cache.

        With a `LayerBatchKV`, the T tokens are T sequences' next tokens (one each, at their own positions)."""
        T = x.shape[0]
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))  # [T, H*D]
        if self.output_gate:
            q, gate = q.view(T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)  # each [T, H, D]
            q = q.reshape(T, self.heads * self.head_dim)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        qk = self._rotate(torch.cat((q, k), dim=1).transpose(0, 1), inp)  # [H + Hkv, T, D], one rotation
        q, k = qk[: self.heads], qk[self.heads :]
        v = v.view(T, self.kv_heads, self.head_dim).transpose(0, 1)
        if isinstance(kv, LayerBatchKV):
            out = self._attend_rows(q, k, v, kv)  # [B, H*D]
            if self.output_gate:
                out = out * torch.sigmoid(gate.reshape(T, -1))
            return self.o_proj(out)
        k_all, v_all = kv.write(k, v)
        mask = inp.mask
        if self.sliding_window is not None:
            mask = kv.window_mask(T, self.sliding_window)  # [T, S]
        if self.sinks is not None:
            out = attend_with_sinks(q, k_all, v_all, mask, self.head_dim**-0.5, self.sinks)  # [T, H*D]
        else:
            out = attend(q, k_all, v_all, mask, self.head_dim**-0.5)  # [T, H*D]
        if self.output_gate:
            out = out * torch.sigmoid(gate.reshape(T, -1))
        return self.o_proj(out)

    def _attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerBatchKV) -> torch.Tensor:
        """q: [Hq, B, D], k/v: [Hkv, B, D], row b's new token -> [B, Hq * D]: every row against its own keys in one call."""
        keys, values = kv.write(k.transpose(0, 1), v.transpose(0, 1))  # [B, Hkv, S, D]
        mask = kv.batch.mask(self.sliding_window, kv.ring)  # [B, 1, 1, S]
        query = q.transpose(0, 1)[:, :, None]  # [B, Hq, 1, D]
        if self.sinks is not None:  # one extra zero key/value whose logit is sinks[h]
            B, Hq, S = query.shape[0], self.heads, keys.shape[2]
            keys = torch.cat((keys, keys.new_zeros(B, keys.shape[1], 1, keys.shape[3])), dim=2)
            values = torch.cat((values, values.new_zeros(B, values.shape[1], 1, values.shape[3])), dim=2)
            logits = query.new_zeros(B, 1, 1, S).masked_fill(~mask, float("-inf")).expand(B, Hq, 1, S)
            mask = torch.cat((logits, self.sinks.to(q.dtype)[None, :, None, None].expand(B, Hq, 1, 1)), dim=-1)  # [B, Hq, 1, S+1]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=self.kv_heads != self.heads)
        return out.reshape(query.shape[0], -1)  # [B, Hq * D]

    def _rotate(self, x: torch.Tensor, inp: AttentionInput) -> torch.Tensor:
        """x: [H, T, D] -> [H, T, D] with the first rotary_dim channels rotated (cos/sin: [T, rotary_dim / 2])."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]  # [H, T, R], [H, T, D - R]
        rotated = apply_rotary(rot.float() if self.rope_fp32 else rot, *inp.tables(self.rope_fp32), self.rope_layout).to(x.dtype)
        return rotated if self.rotary_dim == self.head_dim else torch.cat((rotated, rest), dim=-1)


@dataclass(frozen=True)
class MLADims:
    """Shapes of DeepSeek's multi-head latent attention."""

    hidden: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_dim: int


class MLAttention(nn.Module):
    """Multi-head latent attention; the cache holds the compressed latent and the shared rotary key.

    Two equivalent paths: "decompress" projects every cached latent through kv_b_proj into per-head keys and
    values; "absorbed" folds kv_b_proj into the query (q_nope @ W_UK) and the output (@ W_UV^T) and attends over
    the latents directly, so its cost does not include re-projecting the cache. `forward` takes the absorbed path
    when its estimated multiply-adds are fewer (see `absorbs`): always for decode (T == 1, S > 1), not for a
    long prefill (T ~ S). Set `absorb` to True/False to force a path (tests).
    """

    absorb: bool | None = None  # None: choose by cost
    float_linears = ("kv_b_proj",)  # its weight is read as a matrix (the absorbed path): never quantized

    def __init__(self, layer: int, d: MLADims, *, bias: bool, eps: float, scale: float, rope_layout: RopeLayout) -> None:
        super().__init__()
        self.layer, self.d, self.scale, self.rope_layout = layer, d, scale, rope_layout
        qk_dim = d.qk_nope_dim + d.qk_rope_dim
        if d.q_lora_rank is None:
            self.q_proj = nn.Linear(d.hidden, d.heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d.hidden, d.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(d.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(d.q_lora_rank, d.heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d.hidden, d.kv_lora_rank + d.qk_rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(d.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(d.kv_lora_rank, d.heads * (d.qk_nope_dim + d.v_dim), bias=False)
        self.o_proj = nn.Linear(d.heads * d.v_dim, d.hidden, bias=bias)

    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The cache stores (1, kv_lora_rank) latents as keys and (1, rope_dim) rotary keys as values."""
        return (1, self.d.kv_lora_rank), (1, self.d.qk_rope_dim)

    def absorbs(self, T: int, S: int) -> bool:
        """Absorbed iff T*R*(nope+v) + T*S*(2R+rope) < S*R*(nope+v) + T*S*(nope+rope+v) (per-head multiply-adds)."""
        if self.absorb is not None:
            return self.absorb
        d, R, nv = self.d, self.d.kv_lora_rank, self.d.qk_nope_dim + self.d.v_dim
        return T * R * nv + T * S * (2 * R + d.qk_rope_dim) < S * R * nv + T * S * (nv + d.qk_rope_dim)

    def forward(self, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; writes this step's latents and rotary keys into the layer's cache."""
        d, T = self.d, x.shape[0]
        q = self.q_proj(x) if d.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, d.heads, d.qk_nope_dim + d.qk_rope_dim).transpose(0, 1)  # [H, T, qk]
        q_nope, q_rope = q.split([d.qk_nope_dim, d.qk_rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([d.kv_lora_rank, d.qk_rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[None]  # [1, T, R]
        q_rope = apply_rotary(q_rope, inp.cos, inp.sin, self.rope_layout)
        k_rope = apply_rotary(k_rope[None], inp.cos, inp.sin, self.rope_layout)  # [1, T, rope]
        latent_all, k_rope_all = kv.write(latent, k_rope)  # [1, S, R], [1, S, rope]
        S = latent_all.shape[1]
        if self.absorbs(T, S):
            return self.o_proj(self._absorbed(q_nope, q_rope, latent_all, k_rope_all, inp.mask))
        kv = self.kv_b_proj(latent_all[0]).view(S, d.heads, d.qk_nope_dim + d.v_dim).transpose(0, 1)
        k_nope, v = kv.split([d.qk_nope_dim, d.v_dim], dim=-1)  # [H, S, nope], [H, S, v]
        k = torch.cat((k_nope, k_rope_all.expand(d.heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return self.o_proj(attend(q, k, v, inp.mask, self.scale))

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent_all: torch.Tensor, k_rope_all: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention over the latents with kv_b_proj folded into q and out: one shared KV head -> [T, H * v]."""
        d, (H, T, _) = self.d, q_nope.shape
        w_uk, w_uv = self.kv_b_proj.weight.view(H, d.qk_nope_dim + d.v_dim, d.kv_lora_rank).split([d.qk_nope_dim, d.v_dim], dim=1)
        q = torch.cat((q_nope @ w_uk, q_rope), dim=-1).reshape(1, 1, H * T, -1)  # [1, 1, H*T, R+rope], row h*T+t
        k = torch.cat((latent_all, k_rope_all), dim=-1)[None]  # [1, 1, S, R+rope]
        mask = None if mask is None else mask.repeat(H, 1)  # [H*T, S]
        out = F.scaled_dot_product_attention(q, k, latent_all[None], attn_mask=mask, scale=self.scale)  # [1, 1, H*T, R]
        out = out.view(H, T, d.kv_lora_rank) @ w_uv.transpose(1, 2)  # [H, T, v]
        return out.transpose(0, 1).reshape(T, H * d.v_dim)
