"""Chat templates for models whose files carry none.

The Gemma 3 base model's GGUF has no `tokenizer.chat_template`; the Gemma family's turn
format is public (`<start_of_turn>user ... <end_of_turn>`), so heron ships it as the
fallback for `gemma3` models. Other models without a template need an explicit one.
"""
from __future__ import annotations

GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def fallback_chat_template(model_type: str | None) -> str | None:
    if model_type and model_type.startswith("gemma"):
        return GEMMA_TURN_TEMPLATE
    return None
