"""Chat prompts: the model's own chat template, rendered the way transformers renders it.

GGUF files carry it as `tokenizer.chat_template`, ONNX GenAI folders as chat_template.jinja or in
tokenizer_config.json, HF folders in the tokenizer. Templates come from model files, which are
untrusted input, so they render in Jinja's immutable sandbox. A model without one gets a plain
"System/User/Assistant" layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    messages: Sequence[dict[str, str]],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    return str(
        _compile(template or FALLBACK_TEMPLATE).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    )


def template_from_folder(path: Path) -> str | None:
    """chat_template.jinja, or tokenizer_config.json's chat_template, in a model folder."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError):
            return None
        return value if isinstance(value, str) else None
    return None
