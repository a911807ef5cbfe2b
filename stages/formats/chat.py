"""Prompt formats the train stage can write besides the base's own chat template, each given twice:
as Python (what training writes) and as the Jinja chat template a release carries, so llama.cpp,
Docker Model Runner and Ollama prompt the model as it was trained. The parity check holds them equal.
"""

from __future__ import annotations


def with_system(turns, system: str | None) -> tuple[dict, ...]:
    """The turns with `system` first, where a system prompt is given and the turns bring none of their own:
    what the train stage formats, and so what every runtime must be sent to prompt the model alike."""
    turns = tuple(turns)
    if system and turns[0]["role"] != "system":
        return ({"role": "system", "content": system}, *turns)
    return turns


def alpaca_prompt(turns: list[dict]) -> str:
    """The Alpaca prompt for a conversation so far: every non-assistant turn (system and users) as the
    instruction, then the response header. Earlier answers are not repeated: Alpaca has one turn."""
    instruction = "\n\n".join(t["content"] for t in turns if t["role"] != "assistant")
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


# The same in Jinja, as transformers and llama.cpp's Jinja engine render chat templates: with a final
# assistant turn (training) it writes the answer and EOS; otherwise it ends at the response header.
ALPACA_JINJA = (
    "{%- set ns = namespace(instruction='', first=true) -%}"
    "{%- set turns = messages[:-1] if messages[-1]['role'] == 'assistant' else messages -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != 'assistant' -%}"
    "{%- set ns.instruction = ns.instruction + ('' if ns.first else '\\n\\n') + message['content'] -%}"
    "{%- set ns.first = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '### Instruction:\\n' + ns.instruction + '\\n\\n### Response:\\n' -}}"
    "{%- if messages[-1]['role'] == 'assistant' -%}{{- messages[-1]['content'] + eos_token -}}{%- endif -%}"
)
