"""Gated DeltaNet linear attention (Qwen3.5's `linear_attention` layers): short causal conv, then the gated delta rule.

Per sequence the layer keeps a RecurrentState: the conv window (the last K-1 inputs of the conv) and the
delta-rule state (one [Dk, Dv] matrix per value head, float32); both start at zero, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mobile_moe.layers.attention import AttentionInput
from mobile_moe.layers.kv_cache import LayerKV, RecurrentState
from mobile_moe.layers.mlp import activation


@dataclass(frozen=True)
class DeltaNetDims:
    """Shapes of a Gated DeltaNet layer."""

    hidden: int
    key_heads: int
    value_heads: int
    key_dim: int  # per head
    value_dim: int  # per head
    conv_kernel: int


class GatedRMSNorm(nn.Module):
    """RMSNorm (float32, scale applied in the input dtype) multiplied by silu(gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x, gate: [..., dim] -> [..., dim]."""
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (self.weight * normed.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """q, k: [T, H, Dk] (l2-normalised, q scaled), v: [T, H, Dv], g/beta: [T, H], state: [H, Dk, Dv] float32, updated in place
    -> out [T, H, Dv] float32. Per token: S = exp(g) S; S += k (beta (v - k^T S))^T; out = q^T S."""
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    s = state
    for t in range(q.shape[0]):
        s = s * g[t].exp()[:, None, None]
        delta = (v[t] - torch.einsum("hkv,hk->hv", s, k[t])) * beta[t][:, None]  # [H, Dv]
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hkv,hk->hv", s, q[t])
    state.copy_(s)
    return out


def chunked_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """The same rule as `gated_delta_rule`, `chunk` tokens per step: within a chunk the updates u (rows of U) solve
    (I + A) U = beta (V - exp(G) K S0), A[t, j] = beta_t exp(G_t - G_j) k_t.k_j for j < t, G = cumsum(g); then
    out = exp(G) Q S0 + (exp(G_t - G_j) q_t.k_j)_{j<=t} U and S = exp(G_C) S0 + (exp(G_C - G) K)^T U."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    g, beta = g.T, beta.T  # [H, T]
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)  # [H, T, Dv]
    s = state
    for start in range(0, q.shape[1], chunk):
        qc, kc, vc, gc, bc = (x[:, start : start + chunk] for x in (q, k, v, g, beta))
        n = qc.shape[1]
        cum = gc.cumsum(-1)  # [H, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, n, n], exp(G_t - G_j) for j <= t
        a = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * decay).tril(-1)
        rhs = bc[:, :, None] * (vc - (cum.exp()[:, :, None] * kc) @ s)  # [H, n, Dv]
        u = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)  # [H, n, Dv]
        out[:, start : start + n] = (qc * cum.exp()[:, :, None]) @ s + ((qc @ kc.transpose(1, 2)) * decay) @ u
        s = s * cum[:, -1:, None].exp() + (kc * (cum[:, -1:] - cum).exp()[:, :, None]).transpose(1, 2) @ u
    state.copy_(s)
    return out.transpose(0, 1)


class GatedDeltaNet(nn.Module):
    """Linear-attention token mixer with a recurrent state; parameter names follow the hub checkpoints (`linear_attn.*`)."""

    # its projections keep the row-major layout: q and k are l2-normalised per head, which amplifies a change of
    # summation order (column-major float32 moved the tiny test model's logits 1.6e-4 from transformers', against 1e-5)
    row_major_weights = True

    def __init__(self, layer: int, d: DeltaNetDims, *, eps: float, act: str) -> None:
        super().__init__()
        self.layer, self.d = layer, d
        self.key_width, self.value_width = d.key_heads * d.key_dim, d.value_heads * d.value_dim
        self.conv_dim = 2 * self.key_width + self.value_width
        self.in_proj_qkv = nn.Linear(d.hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(d.hidden, self.value_width, bias=False)
        self.in_proj_b = nn.Linear(d.hidden, d.value_heads, bias=False)
        self.in_proj_a = nn.Linear(d.hidden, d.value_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d.conv_kernel, groups=self.conv_dim, bias=False)  # weight [C, 1, K]
        self.dt_bias = nn.Parameter(torch.ones(d.value_heads))
        self.A_log = nn.Parameter(torch.zeros(d.value_heads))
        self.norm = GatedRMSNorm(d.value_dim, eps)
        self.out_proj = nn.Linear(self.value_width, d.hidden, bias=False)
        self.act = activation(act)

    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """No keys or values: the sequence state is the recurrent one (`new_state`)."""
        return (0, 0), (0, 0)

    def new_state(self, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        """Zero state of one sequence: conv window [C, K-1] (compute dtype), delta-rule state [Hv, Dk, Dv] float32."""
        d = self.d
        return RecurrentState(
            {
                "conv": torch.zeros(self.conv_dim, d.conv_kernel - 1, device=device, dtype=dtype),
                "recurrent": torch.zeros(d.value_heads, d.key_dim, d.value_dim, device=device, dtype=torch.float32),
            }
        )

    def forward(self, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; advances this layer's recurrent state (kv.recurrent) by T positions."""
        d, T = self.d, x.shape[0]
        assert kv.recurrent is not None
        state = kv.recurrent.tensors
        mixed = self.in_proj_qkv(x).T  # [C, T]
        window = torch.cat((state["conv"], mixed), dim=-1)  # [C, K-1+T]
        state["conv"].copy_(window[:, window.shape[1] - (d.conv_kernel - 1) :])
        mixed = self.act(F.conv1d(window[None], self.conv1d.weight, groups=self.conv_dim)[0]).T  # [T, C]
        q, k, v = mixed.split([self.key_width, self.key_width, self.value_width], dim=-1)
        repeat = d.value_heads // d.key_heads  # each q/k head serves `repeat` consecutive value heads
        q = l2_normalize(q.float().view(T, d.key_heads, d.key_dim)).repeat_interleave(repeat, dim=1) * d.key_dim**-0.5  # [T, Hv, Dk]
        k = l2_normalize(k.float().view(T, d.key_heads, d.key_dim)).repeat_interleave(repeat, dim=1)  # [T, Hv, Dk]
        beta = self.in_proj_b(x).sigmoid().float()  # [T, Hv]
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # [T, Hv], log decay <= 0
        rule = gated_delta_rule if T == 1 else chunked_gated_delta_rule  # per token for decode, chunked for prompts (as transformers)
        out = rule(q, k, v.float().view(T, d.value_heads, d.value_dim), g, beta, state["recurrent"]).to(x.dtype)
        z = self.in_proj_z(x).view(T, d.value_heads, d.value_dim)
        return self.out_proj(self.norm(out, z).reshape(T, self.value_width))
