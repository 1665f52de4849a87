"""The decoder-only MoE transformer all adapters assemble: embeddings, decoder layers, final norm, LM head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mobile_moe.layers.attention import AttentionInput, causal_mask
from mobile_moe.layers.fused import to_column_major
from mobile_moe.layers.kv_cache import BatchKV, KVCache, LayerBatchKV, LayerKV
from mobile_moe.layers.mlp import ClampedSwiGLU
from mobile_moe.layers.moe import ExpertRunner, LayerExperts, MoEBlock, Routing
from mobile_moe.layers.norm import RMSNorm
from mobile_moe.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP (dense or MoE), each with a residual."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, inp: AttentionInput, kv: LayerKV, experts: LayerExperts) -> torch.Tensor:
        """x: [T, H] -> [T, H]; the layer's state comes in as arguments (nothing indexed by a layer number inside)."""
        return self.after_experts(before_experts(self, x, inp, kv), experts)

    def after_experts(self, part: LayerPart, experts: LayerExperts) -> torch.Tensor:
        """Finish the layer from what `before_experts` computed: add the routed experts' output (MoE layers) -> [T, H]."""
        x, h, indices, raw_weights, shared = part
        if h is None:  # a dense layer: already complete
            return x
        assert isinstance(self.mlp, MoEBlock) and indices is not None and raw_weights is not None
        out = self.mlp.routed_experts(h, Routing(indices, raw_weights), experts)
        return x + (out if shared is None else out + shared)


# (x [T, H], MLP input h [T, H] or None for a finished dense layer, top-k indices [T, k], raw gate values [T, k], shared output)
LayerPart = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
Segment = Callable[[DecoderLayer, torch.Tensor, AttentionInput, LayerKV], LayerPart]  # eager or compiled `before_experts`
LayerStep = Callable[[int, DecoderLayer, torch.Tensor, AttentionInput, LayerKV], torch.Tensor]  # (index, layer, x, inp, kv) -> x: a whole layer


def before_experts(layer: DecoderLayer, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> LayerPart:
    """A decoder layer up to its routed experts: attention with its residual, the MLP's norm, the router and the shared
    experts (a dense layer runs whole). Pure tensor code with the layer's state as arguments: compiled with
    `fullgraph=True` it serves every layer of its type, with the engine's expert dispatch between segments."""
    x = x + mix_tokens(layer.self_attn, layer.input_layernorm(x), inp, kv)
    h = layer.post_attention_layernorm(x)
    if not isinstance(layer.mlp, MoEBlock):
        return x + layer.mlp(h), None, None, None, None
    routing = layer.mlp.gate(h)
    return x, h, routing.indices, routing.raw_weights, layer.mlp.shared_output(h)


def mix_tokens(mixer: nn.Module, h: torch.Tensor, inp: AttentionInput, kv: LayerKV | LayerBatchKV) -> torch.Tensor:
    """The layer's token mixer (attention, or a recurrent one) on h [T, H]: a batch of decode rows goes in one call
    where the mixer attends rows together, else row by row against each row's own state."""
    if isinstance(kv, LayerBatchKV) and not getattr(mixer, "batches_rows", False):
        return torch.cat([mixer(h[i : i + 1], inp.row(i), row) for i, row in enumerate(kv.rows)])
    return mixer(h, inp, kv)


class Backbone(nn.Module):
    """Token embeddings, decoder stack and final norm (parameter names follow the hub checkpoints)."""

    def __init__(self, vocab: int, hidden: int, layers: list[DecoderLayer], eps: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden))  # loaded later: no random init
        # (under the loader's meta device, nn.init would import torch's compiler stack: 1.5 s per process)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a built model that the engine needs."""

    model_type: str
    max_context: int
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int
    hidden: int
    expert_intermediate: int
    hidden_act: str | ClampedSwiGLU  # the routed experts' activation (`layers.mlp.activation`)
    eos_token_ids: tuple[int, ...]
    expert_bias: bool = False  # routed experts have biases (gpt-oss), packed with their weights
    interleaved_experts: bool = False  # hub tensors: fused [E, in, out], gate/up columns (packed: rows) alternating (gpt-oss)


class CausalLM(nn.Module):
    """Our runtime model: routed experts are not parameters here; MoE blocks ask the engine to run them."""

    def __init__(self, backbone: Backbone, vocab: int, rotary: RotaryEmbedding, info: ModelInfo, head_bias: bool = False) -> None:
        super().__init__()
        self.model = backbone
        self.lm_head = nn.Linear(backbone.embed_tokens.embedding_dim, vocab, bias=head_bias)
        self.rotary = rotary
        self.info = info

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the embedding's (the LM head may be quantized)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device the dense weights live on."""
        return self.model.embed_tokens.weight.device

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head's output."""
        return self.lm_head.out_features

    def prepare_weights(self) -> None:
        """Call once the weights are final (loaded and placed): fuse linears that share an input (q/k/v, gate/up) in
        every layer and, for float32 on CPU, store every linear's weight column-major (its [out, in] values unchanged):
        there single-row matmuls read it up to 2x faster (a 6144 x 256 head, 1 thread: 0.46 vs 0.96 ms) and many-row
        ones are no slower; half-precision gemv is far slower that way, so those stay row-major (as do modules that
        declare `row_major_weights`)."""
        column_major = self.device.type == "cpu" and self.dtype == torch.float32
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections"):
                module.fuse_projections(column_major)
        if not column_major:
            return
        keep = {id(m) for owner in self.modules() if getattr(owner, "row_major_weights", False) for m in owner.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.is_contiguous() and id(module) not in keep:  # fused rows already are
                module.weight.data = to_column_major(module.weight.data)

    def kv_shapes(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Per-layer (heads, dim) of cached keys and values."""
        shapes = [layer.self_attn.kv_shapes() for layer in self.model.layers]
        return [k for k, _ in shapes], [v for _, v in shapes]

    def kv_windows(self) -> list[int | None]:
        """Per layer, the sliding window its attention keeps (None: the whole context)."""
        return [getattr(layer.self_attn, "sliding_window", None) for layer in self.model.layers]

    def forward(
        self,
        ids: torch.Tensor,
        kv: KVCache,
        runner: ExpertRunner,
        all_logits: bool = False,
        segment: Segment = before_experts,
        layer_step: LayerStep | None = None,
        span: int | None = None,
        keep: torch.Tensor | None = None,
        resume: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ids: [T] at positions kv.length.. -> logits [V] of the last position ([T, V] if all_logits); writes the KV cache.
        With `layer_step` each whole layer (experts included) is that one call instead of segment + expert dispatch.
        A decode pass (T == 1) takes its position from the device (`kv.position`); with `span` its attention reads that
        many keys (>= length + 1), the unfilled ones masked, so its shapes do not change from step to step.
        `keep` [layers, H]: filled with the last position's input to every layer. `resume` (layer, x [T, H]): the pass
        starts at that layer from x, its input there; the layers before keep their KV entries at these positions."""
        T = ids.shape[0]
        kv.check_room(T)
        inp = self.attention_input(ids, kv, span)
        first, x = (0, self.model.embed_tokens(ids)) if resume is None else resume  # x: [T, H]
        for index in range(first, len(self.model.layers)):
            layer, layer_kv = self.model.layers[index], kv.layer(index, span)
            if keep is not None:
                keep[index].copy_(x[-1])
            if layer_step is not None:
                x = layer_step(index, layer, x, inp, layer_kv)
            elif segment is before_experts:  # eager: the module call (its hooks fire)
                x = layer(x, inp, layer_kv, runner.at(index))
            else:
                x = layer.after_experts(segment(layer, x, inp, layer_kv), runner.at(index))
        kv.advance(T)
        x = self.model.norm(x if all_logits else x[-1:])
        logits = self.lm_head(x)
        return logits if all_logits else logits[0]

    def attention_input(self, ids: torch.Tensor, kv: KVCache, span: int | None) -> AttentionInput:
        """The pass's rotary tables and mask: a decode pass from the device-held position (a [1, span] mask of the filled
        keys when reading a fixed span), a prompt chunk from host positions with a causal mask."""
        T, start = ids.shape[0], kv.length
        if T == 1:
            if span is not None and span < start + 1:
                raise ValueError(f"a decode span of {span} keys cannot hold position {start}")
            mask = None if span is None else (torch.arange(span, device=ids.device) <= kv.position)[None]  # [1, S]
            cos, sin = self.rotary(kv.position)
            return AttentionInput.of(cos, sin, mask, self.dtype)
        cos, sin = self.rotary(torch.arange(start, start + T, device=ids.device))
        return AttentionInput.of(cos, sin, causal_mask(start, T, ids.device), self.dtype)

    def forward_rows(self, ids: torch.Tensor, batch: BatchKV, runner: ExpertRunner) -> torch.Tensor:
        """ids: [B], row b's next token at position batch.starts[b] -> logits [B, V]; writes one position of every row."""
        batch.check_room()
        cos, sin = self.rotary(batch.start_index)  # [B, rot/2]: each row at its own position
        inp = AttentionInput.of(cos, sin, None, self.dtype)
        x = self.model.embed_tokens(ids)  # [B, H]
        for index, layer in enumerate(self.model.layers):
            x = layer(x, inp, batch.layer(index), runner.at(index))
        batch.advance()
        return self.lm_head(self.model.norm(x))
