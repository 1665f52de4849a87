"""Conversation affinity on Ray Serve: a request router (Serve's request-router extension API) that sends a chat's later
turns to the replica that served its earlier ones, whose batch rows may still hold the conversation's prefix, and
otherwise routes by power of two choices on queue length, as Serve's default router does."""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT_KEY_CHARS = 64  # a completion prompt's conversation: its first this many characters (shorter prompts: none)
MAX_CONVERSATIONS = 4096  # conversations the router remembers, the least recently routed forgotten first
KEY = "conversation"  # the handle call's keyword argument the router reads


def conversation_key(path: str, body: bytes) -> str | None:
    """A request's conversation: a chat's messages up to its first user message (every later turn starts with them), a
    completion's first PROMPT_KEY_CHARS characters; None when the body names none (or is not JSON: the replica answers it)."""
    try:
        data = json.loads(body) if path in (CHAT, COMPLETIONS) else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if path == CHAT:
        messages = data.get("messages")
        if not isinstance(messages, list):
            return None
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
        head = messages if first_user is None else messages[: first_user + 1]
        return _digest(head)
    prompt = data.get("prompt")
    one = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))  # several prompts: by queue length
    return _digest(prompt[:PROMPT_KEY_CHARS]) if one and len(prompt) >= PROMPT_KEY_CHARS else None


def _digest(value: object) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=16).hexdigest()


class ConversationRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """First rank: the replica that served the request's conversation last (taken only while it has a free row: Serve
    probes its queue against max_ongoing_requests); second rank: two random replicas, the shorter queue wins."""

    def initialize_state(self, max_conversations: int = MAX_CONVERSATIONS) -> None:
        """Serve calls this once with the deployment's request_router_kwargs."""
        self.max_conversations = max_conversations
        self.served: OrderedDict[str, ReplicaID] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """The ranks Serve tries in order (the first whose replica accepts the request wins)."""
        local = self.apply_locality_routing(pending_request=pending_request)  # this node's replicas first, as Serve's default router
        pool = [r for r in candidate_replicas if r.replica_id in local] or candidate_replicas
        pair = random.sample(pool, k=min(2, len(pool)))
        last = self.served.get(key_of(pending_request) or "")
        preferred = [r for r in candidate_replicas if r.replica_id == last]
        return [preferred, pair] if preferred else [pair]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        """Remember which replica took the conversation."""
        key = key_of(pending_request)
        if key is None:
            return
        self.served[key] = replica_id
        self.served.move_to_end(key)
        while len(self.served) > self.max_conversations:
            self.served.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget the conversations of a replica that is gone (its prefixes went with it)."""
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self.served.items() if r == replica_id]:
            del self.served[key]


def key_of(request: PendingRequest | None) -> str | None:
    """The conversation key the ingress passed with the call, if any."""
    return None if request is None else request.kwargs.get(KEY)
