"""Constrained decoding: a JSON schema compiled by xgrammar (the optional [structured] extra) into one request's token
mask, which every pass's logits get before they are read (little, big and a fallback's big alike)."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from mobile_moe.errors import InvalidParameter

MAX_ERROR_CHARS = 200  # a schema's error is cut to this many characters


def _xgrammar() -> Any:
    """The xgrammar module, or a one-line InvalidParameter naming the extra that brings it."""
    try:
        import xgrammar
    except ImportError:
        raise InvalidParameter("constrained decoding (json_schema, response_format) needs xgrammar: pip install 'mobile-moe[structured]'") from None
    return xgrammar


class Grammars:
    """One model's grammar compiler, built from its tokenizer on first use; xgrammar caches each compiled schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, list(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compile(self, schema: dict) -> Any:
        """The compiled grammar of a JSON schema (compact separators, so whitespace cannot run on); a bad schema is an
        InvalidParameter naming its problem in one line."""
        if self.tokenizer is None:
            raise InvalidParameter("constrained decoding needs the checkpoint's tokenizer")
        xgr = _xgrammar()
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
        try:
            return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError / InvalidJSONError with a C++ location prefix
            why = " ".join(str(e).split()).rsplit(": ", 1)[-1] if ": " in str(e) else " ".join(str(e).split())
            raise InvalidParameter(f"json_schema is not a schema xgrammar can compile: {why[:MAX_ERROR_CHARS]}") from None


class GrammarState:
    """One generation's place in its grammar: `apply` masks the tokens it forbids, `advance` takes the emitted token."""

    def __init__(self, compiled: Any) -> None:
        xgr = _xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids here to -inf, in place."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        backend = "cpu" if logits.device.type == "cpu" else "torch_native"  # plain torch ops on an accelerator: no kernel JIT at first use
        self._apply(logits, self.bitmask[0].to(logits.device), backend=backend)

    def advance(self, token: int) -> bool:
        """Take the emitted token; whether the grammar is finished (its stop token taken: nothing may follow)."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} was emitted against the grammar's mask")
        return self.matcher.is_terminated()
