"""Write a tiny random-weight Llama that real vLLM can serve, fully offline.

Run with the vLLM environment's interpreter (it has torch, transformers and tokenizers):

    python tests/vllm/build_tiny_model.py OUT_DIR

OUT_DIR gets ``config.json`` + ``model.safetensors`` (float32, hidden 128, 2 layers, 2 heads
of 64) and a byte-level BPE tokenizer trained here on generated text, with a ChatML-like
chat template and ``<s>``/``</s>`` as BOS/EOS. The weights are random: the model produces
noise, which is all a routing test needs. Takes a few seconds; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

# Set before transformers is imported: it reads them at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
# Big enough that generated prose tokenizes to roughly one token per word, small enough
# that the embedding matrices stay tiny (4,096 x 128 floats = 2 MB each).
VOCAB_SIZE = 4096
MAX_POSITIONS = 2048
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEED = 1234


def generated_corpus(seed: int = SEED, sentences: int = 20_000) -> list[str]:
    """Pseudo-English from a fixed word list: deterministic, and shaped like the prompts
    the tests send (tests build their prompts from the same kind of words)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ter", "an", "dis", "pro", "ve", "sun", "or", "el", "qu",
                 "ba", "ri", "to", "men", "st", "ul", "ne", "gra", "pha", "io", "re", "cy"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                    for _ in range(3000)})
    words += ["the", "a", "of", "and", "to", "in", "is", "you", "that", "it", "for", "on",
              "with", "as", "are", "this", "be", "at", "or", "by", "what", "how", "why",
              "question", "answer", "system", "user", "assistant", "please", "explain"]
    out = []
    for _ in range(sentences):
        n = rng.randint(4, 18)
        text = " ".join(rng.choice(words) for _ in range(n))
        out.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", ",", ";"])
                   + rng.choice(["", " 12", " 2024", " (x)", " \"q\"", " -", "\n"]))
    return out


def build_tokenizer(corpus: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on ``corpus``; special tokens are ids 0-3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build(out_dir: Path) -> None:
    """Write the model and tokenizer into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(generated_corpus())
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    # transformers may write the template to chat_template.jinja only; keep it in the
    # config too, where every reader (ours included) finds it.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS), tie_word_embeddings=False)
    config.dtype = "float32"
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.monotonic()
    build(Path(argv[0]))
    print(f"tiny model written to {argv[0]} in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
