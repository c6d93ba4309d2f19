"""A tiny random causal LM with a real byte-level BPE tokenizer, built from a config.

Fast tests need a model that behaves like a real one (KV cache, chat template,
multi-byte characters split across tokens, an EOS token) but loads in milliseconds
and needs no network. The weights are random, seeded: outputs are reproducible.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "The answer is 8. Let me think step by step: 3 + 5 = 8.",
    "Wait, however, thus, suppose, since, so, but, first, now.",
    "Café naïve résumé — Ünïcödé text, 日本語のテキスト, emoji 😀🚀🧠 and ∑ ∫ √ ≠ ≤.",
    "def f(x):\n    return x * 2\n\n# Final answer: 42",
]
SCALE = 50.0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model_dir(
    path: Path, *, seed: int = 0, vocab_size: int = 400, context: int = 512
) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    transformers.logging.disable_progress_bar()  # keeps test output readable
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|eos|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Larger logits than the default init so the distribution is not near-uniform:
    # entropies then spread over a useful range, like a trained model's.
    with torch.no_grad():
        model.lm_head.weight.mul_(SCALE)
    model.save_pretrained(path, safe_serialization=True)
    return path
