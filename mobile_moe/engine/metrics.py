"""Per-request counters and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    """What one generate call did and how long it took."""

    prompt_tokens: int = 0
    tokens: int = 0
    fallback_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    expert_hits: int = 0
    expert_misses: int = 0
    prefetched: int = 0
    h2d_bytes: int = 0
    transfer_wait_s: float = 0.0
    decode_expert_hits: int = 0
    decode_expert_misses: int = 0
    decode_h2d_bytes: int = 0
    decode_transfer_wait_s: float = 0.0
    cache_slots: int = 0
    total_experts: int = 0
    host_pinned_bytes: int = 0
    host_syncs: int = 0  # device->host reads that drain the launch queue, whole request
    decode_host_syncs: int = 0
    disk_bytes: int = 0  # read from the on-disk expert store (--offload-dir), whole request
    decode_disk_bytes: int = 0
    host_tier_hits: int = 0  # three tiers: misses of the compute cache served by the host tier without a disk read
    rolled_back_tokens: int = 0  # little tokens a rollback took back (`PolicyConfig.rollback`): decoded, then replaced
    expert_path: str = ""  # how routed experts were computed (`ExpertExecutor.path`): in-place, grouped, tinygemm, reference, ...
    dense_path: str = ""  # how dense linears were computed (`loading.dense.pack_dense`): their count per kernel layout or float dtype
    graph_captures: int = 0  # decode passes captured as CUDA graphs during the request (`--cuda-graphs`)
    graph_replays: int = 0  # decode passes replayed from captured graphs
    reused_tokens: int = 0  # prompt positions taken from a held sequence instead of prefilled (engine/prefix.py)
    prefix_hits: int = 0  # 1 when the request reused a held prefix
    big_instead_tokens: int = 0  # mobile decode steps run big because, at that batch size, little did not pay (policy/governor.py)
    threads: int = 0  # torch CPU threads the request ran on
    load_s: float = 0.0  # how long loading the model took (once per LLM, repeated in each request's stats)
    total_s: float = 0.0  # the request's wall time: prompt, decode and everything between (not the load)

    @property
    def prompt_tok_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second over the decode steps (the first token comes from prefill)."""
        steps = max(self.tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def host_syncs_per_token(self) -> float:
        """Host syncs per decode step (a fallback step counts both of its passes)."""
        steps = max(self.tokens - 1, 0)
        return self.decode_host_syncs / steps if steps else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of expert requests served from the cache."""
        total = self.expert_hits + self.expert_misses
        return self.expert_hits / total if total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict including derived rates."""
        rates = {
            "decode_tok_s": self.decode_tok_s,
            "prompt_tok_s": self.prompt_tok_s,
            "hit_rate": self.hit_rate,
            "host_syncs_per_token": self.host_syncs_per_token,
        }
        return {**asdict(self), **rates}
