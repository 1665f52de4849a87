"""Convert a checkpoint to GGUF with llama.cpp's own converter, naming the BPE pre-tokenizer where it does not know the tokenizer.

llama.cpp's `convert_hf_to_gguf.py` identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a test text, and
refuses tokenizers it has no hash for (the demo model's own 6144-token BPE tokenizer is one). This runs that converter
unchanged except that such a tokenizer is written with the pre-tokenizer named by `--pre` (the demo's splits with
GPT-2's byte-level regex: `gpt-2`). A tokenizer the converter knows keeps its own name. Speed measurements with
llama-bench do not tokenize text at all (it decodes random ids); the name only lets the file load.
Usage: python scripts/llama_cpp_gguf.py --llama-src /path/to/llama.cpp --pre gpt-2 MODEL_DIR --outtype f32 --outfile F.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn


def refuse(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2."""
    print(f"llama_cpp_gguf: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    """Check the tree, put a subclass with a named fallback pre-tokenizer in the converter's registry, then run its main."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-src", type=Path, required=True, help="llama.cpp's source tree")
    p.add_argument("--pre", default="gpt-2", help="pre-tokenizer name for a tokenizer the converter has no hash for")
    args, rest = p.parse_known_args()
    if not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        refuse(f"no convert_hf_to_gguf.py in {args.llama_src} (give llama.cpp's source tree)")
    model = next((Path(a) for a in rest if not a.startswith("-") and Path(a).is_dir()), None)
    if model is None:
        refuse("give the checkpoint directory to convert")
    sys.path[:0] = [str(args.llama_src), str(args.llama_src / "gguf-py")]
    import convert_hf_to_gguf
    from conversion import get_model_class
    from conversion.base import ModelBase

    arch = json.loads((model / "config.json").read_text())["architectures"][0]
    base = get_model_class(arch)
    pre = args.pre

    class NamedPre(base):  # type: ignore[misc, valid-type]
        """The architecture's converter; a tokenizer without a known hash gets the pre-tokenizer named by --pre."""

        model_arch = base.model_arch  # the converter asks each subclass to name its architecture

        def get_vocab_base_pre(self, tokenizer) -> str:
            """The converter's name for a known tokenizer, else --pre's."""
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                print(f"llama_cpp_gguf: tokenizer not known to the converter: pre-tokenizer {pre!r}", flush=True)
                return pre

    ModelBase.register(arch)(NamedPre)
    sys.argv = [sys.argv[0], *rest]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
