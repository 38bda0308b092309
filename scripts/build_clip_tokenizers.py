"""Write SDXL's two CLIP tokenizers into lora_trainer/model/pretrained/sdxl-base/tokenizer{,_2}/.

    python scripts/build_clip_tokenizers.py

CLIP's byte-pair vocabulary is public: open-clip-torch ships it as `open_clip/bpe_simple_vocab_16e6.txt.gz`.
This script downloads that wheel with pip (no install, no dependencies), reads the file out of the
zip and writes it in the format `transformers.CLIPTokenizer.from_pretrained` reads: vocab.json,
merges.txt, tokenizer_config.json and special_tokens_map.json. It is a developer tool, run once;
lora-train ships its output. open-clip-torch must never become a runtime dependency: it requires
torchvision and timm, whose installs would replace our CPU torch.

The vocabulary is CLIP's: the 256 byte symbols, the same with `</w>` (a word's end), one token
per merge (the first 49152 - 256 - 2 merge lines after the header), then `<|startoftext|>` (49406)
and `<|endoftext|>` (49407): 49,408 tokens. SDXL's first tokenizer (CLIP ViT-L) pads with the end
token, its second (OpenCLIP ViT-bigG) with `!` (id 0), as open_clip pads with zeros.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP = "open-clip-torch==3.3.0"
VOCABULARY_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
OUTPUT = Path(__file__).resolve().parent.parent / "lora_trainer" / "model" / "pretrained" / "sdxl-base"
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-symbol table in CLIP's order: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(shifted))]


def download_merges() -> list[str]:
    """The merge lines of CLIP's vocabulary, read from the open-clip-torch wheel (header dropped)."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", OPEN_CLIP, "--no-deps", "-d", folder], check=True)
        (wheel,) = Path(folder).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            lines = gzip.decompress(archive.read(VOCABULARY_FILE)).decode("utf-8").split("\n")
    assert lines[0].startswith('"bpe_simple_vocab_16e6.txt#version'), lines[0]
    return lines[1 : 1 + MERGES]


def vocabulary(merges: list[str]) -> dict[str, int]:
    symbols = bytes_to_unicode()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge.split()) for merge in merges] + [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE == len(tokens), "a token appears twice"
    return vocab


def added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # The two small files as SDXL base 1.0 has them: start, end and unknown tokens as normalized
    # AddedTokens (so they also match upper-cased), the pad token as a plain string.
    special = {"bos_token": added_token(START), "eos_token": added_token(END), "pad_token": pad_token, "unk_token": added_token(END)}
    typed = {name: {"__type": "AddedToken", **value} if isinstance(value, dict) else value for name, value in special.items()}
    config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **typed,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    merges = download_merges()
    vocab = vocabulary(merges)
    write_tokenizer(OUTPUT / "tokenizer", vocab, merges, pad_token=END)
    write_tokenizer(OUTPUT / "tokenizer_2", vocab, merges, pad_token="!")
    print(f"wrote {OUTPUT / 'tokenizer'} and {OUTPUT / 'tokenizer_2'}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
