"""`mobile-moe chat`: streamed replies equal generate, /stats and /reset, history kept within the context, clear errors."""

from __future__ import annotations

import io

from test_cli import assert_one_line_error, run

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.chat import StreamPrinter, chat, fit_history
from mobile_moe.engine.calibration import DEMO_MODEL

GREEDY = SamplingParams(max_new_tokens=6)


def test_chat_streams_replies_that_equal_generate_and_keeps_history(monkeypatch):
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    first = [{"role": "user", "content": "def add(a, b):"}]
    want1 = llm.decode(llm.generate(llm.chat_prompt(first), GREEDY, PolicyConfig("big")).token_ids)
    second = [*first, {"role": "assistant", "content": want1}, {"role": "user", "content": "x = 1"}]
    want2 = llm.decode(llm.generate(llm.chat_prompt(second), GREEDY, PolicyConfig("big")).token_ids)
    out = io.StringIO()
    code = chat(llm, GREEDY, PolicyConfig("big"), io.StringIO("def add(a, b):\nx = 1\n/stats\n/reset\n/stats\n"), out)
    lines = out.getvalue().split("> ")
    assert code == 0
    assert lines[1] == want1 + "\n" and lines[2] == want2 + "\n"  # the second reply saw the first turn
    assert "tok/s decode" in lines[3] and "fallback rate" in lines[3] and "expert hit rate" in lines[3]
    assert lines[4] == "(conversation cleared)\n"


def test_history_drops_the_oldest_turns_to_fit_the_context():
    llm = LLM(DEMO_MODEL, engine_config(progress=False, max_context=64))
    history = [{"role": "user", "content": "a " * 20}, {"role": "assistant", "content": "b " * 20}, {"role": "user", "content": "c"}]
    ids = fit_history(llm, history, 16)
    assert ids is not None and len(ids) + 16 <= 64 and history == [{"role": "user", "content": "c"}]
    assert fit_history(llm, [{"role": "user", "content": "d " * 100}], 16) is None


def test_unknown_commands_get_a_note_and_are_not_sent_to_the_model():
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    prompts = []
    real = llm.generate
    llm.generate = lambda ids, *a, **k: prompts.append(ids) or real(ids, *a, **k)
    out = io.StringIO()
    assert chat(llm, GREEDY, PolicyConfig("big"), io.StringIO("/foo\n/help me\n/usr/bin/env python\n"), out) == 0
    lines = out.getvalue().split("> ")
    note = "(unknown command {}; the commands are /reset, /stats; nothing was sent to the model)\n"
    assert lines[1] == note.format("/foo") and lines[2] == note.format("/help")
    assert prompts == [llm.chat_prompt([{"role": "user", "content": "/usr/bin/env python"}])]  # a path is text; the unknown commands left no history


def test_chat_without_a_chat_template_is_a_one_line_error(capsys, checkpoints):
    assert_one_line_error(*run(capsys, "chat", "--model", str(checkpoints["olmoe"]), "--quiet")[::2], "no chat template")


def test_a_character_split_over_tokens_is_printed_whole_and_the_history_keeps_it():
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    text = "x = '日本語 é ü'"
    ids = llm.encode(text)
    assert any(llm.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # this tokenizer splits those characters' bytes
    out = io.StringIO()
    printer = StreamPrinter(llm, out)
    for token in ids:
        printer(token)
    assert printer.finish() == text and out.getvalue() == text
    cut = next(i for i in range(1, len(ids)) if llm.decode(ids[:i]).endswith("\ufffd"))
    out = io.StringIO()
    printer = StreamPrinter(llm, out)
    for token in ids[:cut]:
        printer(token)
    assert "\ufffd" not in out.getvalue() and printer.finish() == llm.decode(ids[:cut]) == out.getvalue()  # ended mid-character: shown at the end


def test_generate_streams_exactly_the_text_it_returns(capsys):
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    want = llm.generate("def add(a, b):", SamplingParams(max_new_tokens=12), PolicyConfig("big")).text
    code, out, err = run(capsys, "generate", "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--quiet")
    assert code == 0 and out == want + "\n" and "tok/s decode" in err
