"""How a prompt becomes the token ids fed to a model: the chat (a system message, the
user's prompt), the chat template's extra variables (enable_thinking) and the plain-text
path. Shared by every engine (the llama.cpp engine's tokenizer renders the same
template); no torch here."""

from __future__ import annotations

from typing import Any

from models.errors import ModelError


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat a prompt is sent as: one user message, after a system message when
    `system` is given. Every backend that renders a chat template builds it here."""
    messages = [{"role": "user", "content": prompt}]
    return with_system(messages, system)


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """`messages` with a system message first when `system` is given and the list has
    no system message of its own (one it has wins)."""
    if system is None or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def template_kwargs(enable_thinking: bool | None = None) -> dict[str, Any]:
    """Extra variables for the chat template, beside messages and add_generation_prompt:
    `enable_thinking` only when set (Qwen3-style templates read it; others ignore it)."""
    return {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}


def apply_template(tokenizer: Any, messages: list[dict[str, str]],
                   enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a chat through the tokenizer's chat template, generation prompt
    added."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **template_kwargs(enable_thinking))
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(i) for i in ids]


def encode_prompt(lm: Any, prompt: str, raw: bool = False, *,
                  system: str | None = None,
                  enable_thinking: bool | None = None) -> list[int]:
    """Token ids fed to the model: the chat template when the tokenizer has one (unless
    raw), else the plain text, as MI-Peaks did. With the template, `system` adds a
    system message and `enable_thinking` (when not None) is passed to it; plain text
    ignores `enable_thinking` and refuses `system` (it would be lost)."""
    if not prompt or not prompt.strip():
        raise ModelError("the prompt is empty")
    tok = lm.tokenizer
    templated = not raw and bool(getattr(tok, "chat_template", None))
    if system is not None and not templated:
        raise ModelError("a system prompt needs the chat template" + (
            " (leave out --raw)" if raw else ": this model's tokenizer has none"))
    if templated:
        ids = apply_template(tok, chat_messages(prompt, system), enable_thinking)
    else:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
    ids = [int(i) for i in ids]
    if lm.context_length and len(ids) >= lm.context_length:
        raise ModelError(
            f"the prompt is {len(ids)} tokens but the model's context is "
            f"{lm.context_length} tokens"
        )
    return ids
