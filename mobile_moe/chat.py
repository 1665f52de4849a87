"""`mobile-moe chat`: a terminal conversation streamed token by token, history kept within the context."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import TextIO

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM, check_utf8, settled
from mobile_moe.errors import InvalidParameter

HELP = "type a message; /reset forgets the conversation, /stats shows the last reply's numbers, Ctrl-C stops a reply, Ctrl-D exits"
COMMANDS = ("/reset", "/stats")
COMMAND = re.compile(r"/[A-Za-z][\w-]*")  # `/foo` is a command; `/usr/bin/env python` or `/ 2` is text for the model


@dataclass
class StreamPrinter:
    """Prints each token's new text as it is made (decoding the whole reply; a character whose bytes span several tokens
    is held back until it is whole)."""

    llm: LLM
    out: TextIO
    ids: list[int] = field(default_factory=list)
    text: str = ""  # what has been printed

    def __call__(self, token: int) -> bool:
        self.ids.append(token)
        self._print(settled(self.llm.decode(self.ids) or ""))
        return True

    def finish(self) -> str:
        """Print what was held back (the reply ended inside a character) and return the whole reply."""
        self._print(self.llm.decode(self.ids) or "")
        return self.text

    def _print(self, text: str) -> None:
        if text.startswith(self.text) and len(text) > len(self.text):
            self.out.write(text[len(self.text) :])
            self.out.flush()
            self.text = text


def fit_history(llm: LLM, history: list[dict[str, str]], new_tokens: int) -> list[int] | None:
    """The prompt of the latest messages that leave room for `new_tokens`; older turns are dropped. None if even the last does not fit."""
    while history:
        ids = llm.chat_prompt(history)
        if len(ids) + new_tokens <= llm.max_context:
            return ids
        del history[: 2 if len(history) > 1 else 1]
    return None


def stats_line(result: GenerationResult | None) -> str:
    """The last reply's speed, fallback rate and cache hit rate."""
    if result is None:
        return "(no reply yet)"
    s = result.stats
    return (
        f"{s.tokens} tokens, {s.decode_tok_s:.1f} tok/s decode, prompt {s.prompt_tokens} tokens at {s.prompt_tok_s:.1f} tok/s, "
        f"threads {s.threads}, total {s.total_s:.2f}s, fallback rate {s.fallback_tokens / max(s.tokens - 1, 1):.1%}, expert hit rate {s.hit_rate:.0%}"
    )


def command_of(message: str) -> str | None:
    """The `/command` a message starts with, or None for text meant for the model."""
    words = message.split()
    return words[0] if words and COMMAND.fullmatch(words[0]) else None


def unknown_command_note(command: str) -> str:
    """One line for a `/command` chat does not know (it is not sent to the model)."""
    return f"(unknown command {command}; the commands are {', '.join(COMMANDS)}; nothing was sent to the model)"


def is_text(message: str, out: TextIO) -> bool:
    """Whether the message is Unicode text; if not, say so in one line on stderr (nothing is sent to the model)."""
    try:
        check_utf8(message, "the message")
    except InvalidParameter as e:
        out.write("\n")
        out.flush()
        print(f"mobile-moe: error: {e}; nothing was sent to the model", file=sys.stderr, flush=True)
        return False
    return True


def chat(llm: LLM, sampling: SamplingParams, policy: PolicyConfig, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Read messages until end of input; stream each reply. A message that is not text is refused in one line on stderr and
    the conversation goes on; the exit status is then 2."""
    history: list[dict[str, str]] = []
    last: GenerationResult | None = None
    status = 0
    print(HELP, file=sys.stderr)
    while True:
        out.write("> ")
        out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:  # Ctrl-D / end of input
            out.write("\n")
            return status
        message = line.rstrip("\n")
        command = command_of(message)
        if not is_text(message, out):
            status = 2
        elif command == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
        elif command == "/stats":
            out.write(stats_line(last) + "\n")
        elif command is not None:
            out.write(unknown_command_note(command) + "\n")
        elif message.strip():
            history.append({"role": "user", "content": message})
            ids = fit_history(llm, history, sampling.max_new_tokens)
            if ids is None:
                out.write(f"(that message does not fit the {llm.max_context}-token context with room for a reply)\n")
                continue
            printer = StreamPrinter(llm, out)
            try:
                last = llm.generate(ids, sampling, policy, on_token=printer)
            except KeyboardInterrupt:
                out.write(" (stopped)")
            history.append({"role": "assistant", "content": printer.finish()})
            out.write("\n")
