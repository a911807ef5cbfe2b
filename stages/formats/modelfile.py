"""Deployment texts beside a packaged GGUF: an Ollama Modelfile and a Compose `models:` snippet.

Ollama's Modelfile: one instruction per line, `FROM`, `ADAPTER`, `TEMPLATE`, `SYSTEM`,
`PARAMETER name value`, `LICENSE`; multi-line values in triple quotes. `TEMPLATE` is a Go
text/template over `.Messages` (each with `.Role` and `.Content`); Ollama puts the Modelfile's
`SYSTEM` first in `.Messages` when a request brings no system message of its own.

Hugging Face chat templates are Jinja and cannot be run by Ollama, so each supported family
gets its Go translation here, checked against the family's Jinja template on a two-turn
conversation (tests/golden/modelfile). A template of no known family gets no `TEMPLATE`:
Ollama then picks one itself from the GGUF's `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..ground.errors import BuildError


@dataclass(frozen=True)
class ChatFamily:
    name: str
    markers: tuple[str, ...]  # all present in a Jinja chat template of this family
    template: str  # Ollama's Go template

    @property
    def opener(self) -> str:
        """The marker that opens a turn: a stop word, so a model that runs past its end of turn stops
        before it writes the next one."""
        return self.markers[0]


CHATML = ChatFamily(
    "chatml", ("<|im_start|>", "<|im_end|>"),
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

LLAMA3 = ChatFamily(
    "llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)

# Gemma has no system turn: like Gemma 3's own template, the system text opens the first user turn.
GEMMA = ChatFamily(
    "gemma", ("<start_of_turn>", "<end_of_turn>"),
    '{{- $system := "" }}\n'
    "{{- range .Messages }}\n"
    '{{- if eq .Role "system" }}{{ $system = .Content }}\n'
    '{{- else if eq .Role "user" }}<start_of_turn>user\n'
    '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
    "{{ .Content }}<end_of_turn>\n"
    "{{ end }}\n"
    "{{- end }}<start_of_turn>model\n"
)

# Mistral Instruct v0.3: the system text goes into the last user turn; no generation header.
MISTRAL = ChatFamily(
    "mistral", ("[INST]", "[/INST]"),
    '{{- $system := "" }}\n'
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq .Role "system" }}{{ $system = .Content }}\n'
    '{{- else if eq .Role "user" }}[INST] {{ if and $last $system }}{{ $system }}\n\n{{ end }}{{ .Content }}[/INST]\n'
    '{{- else if eq .Role "assistant" }} {{ .Content }}</s>\n'
    "{{- end }}\n"
    "{{- end }}"
)

# Phi-3 and Phi-3.5 Instruct: a role tag, a newline, the text and <|end|>. (Phi-4-mini writes the same
# tags with no newlines: the newline after <|assistant|> keeps it out of this family.)
PHI3 = ChatFamily(
    "phi3", ("<|user|>", "<|assistant|>\n", "<|end|>"),
    "{{- range .Messages }}<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ end }}<|assistant|>\n"
)

# modelmake's own Alpaca format (formats.chat), for a model trained with template = "alpaca": the
# instruction is every system and user turn, joined by blank lines; earlier answers are not repeated.
ALPACA = ChatFamily(
    "alpaca", ("### Instruction:", "### Response:"),
    "{{- $first := true }}### Instruction:\n"
    '{{ range .Messages }}{{ if ne .Role "assistant" }}{{ if not $first }}\n\n{{ end }}'
    "{{ .Content }}{{ $first = false }}{{ end }}{{ end }}\n\n### Response:\n"
)

FAMILIES = (LLAMA3, CHATML, GEMMA, MISTRAL, PHI3, ALPACA)


def chat_family(jinja_template: str | None) -> ChatFamily | None:
    """The family whose markers a Hugging Face chat template uses; None when none fits."""
    if not jinja_template or "<<SYS>>" in jinja_template:  # Llama 2 shares [INST] but not its layout
        return None
    return next((f for f in FAMILIES if all(m in jinja_template for m in f.markers)), None)


def default_system(jinja_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when a conversation brings none (SmolLM2, Qwen2.5):
    as the Modelfile's SYSTEM, Ollama inserts it in the same case, so prompts match the template's."""
    if chat_family(jinja_template) is not CHATML:
        return None
    found = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<\\]+)<\|im_end\|>", jinja_template)
    return found.group(1) if found else None


def served_system(package_system: str | None, train_system: str | None, jinja_template: str | None) -> str | None:
    """The Modelfile's SYSTEM: the spec's, else the one training inserted, else the template's own default."""
    return package_system or train_system or default_system(jinja_template)


def stop_words(end_of_generation: list[str], family: ChatFamily | None) -> list[str]:
    """PARAMETER stop: the tokens llama.cpp ends generation at, read from the GGUF (the parity check has
    made sure the trained end of turn is one of them), and the template's turn opener."""
    return sorted(set(end_of_generation) | ({family.opener} if family else set()))


def quoted(value: str, what: str) -> str:
    """A Modelfile value: bare when it is one plain word, "…" on one line, else \"\"\"…\"\"\"."""
    if '"""' in value:
        raise BuildError(f"{what} contains three double quotes in a row, which an Ollama Modelfile cannot hold")
    if "\n" in value or '"' in value or "\\" in value:
        return f'"""{value}"""'
    return f'"{value}"'


def parameter_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return quoted(str(value), "a PARAMETER value")


def modelfile(*, header: str, from_file: str, adapter_file: str | None, family: ChatFamily | None,
              system: str | None, stop: list[str], parameters: dict, license_text: str | None,
              projector_file: str | None = None) -> str:
    """The Modelfile text. Files are named `./<name>` so `ollama create` finds them beside it. A vision
    model's projector is a second FROM: Ollama takes every FROM file and stores a GGUF whose
    general.type is "mmproj" (llama.cpp's converter writes it so) as the model's projector layer."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append(f"FROM ./{from_file}")
    if projector_file:
        lines.append(f"FROM ./{projector_file}")
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if family:
        lines.append(f"TEMPLATE {quoted(family.template, 'the chat template')}")
    else:
        lines.append("# No TEMPLATE: the chat template is of no family modelmake translates; "
                     "Ollama infers one from the GGUF.")
    if system:
        lines.append(f"SYSTEM {quoted(system, 'package.system')}")
    for word in stop:
        lines.append(f"PARAMETER stop {quoted(word, 'a stop token')}")
    for name, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {name} {parameter_value(item)}")
    if license_text:
        lines.append(f"LICENSE {quoted(license_text.strip(), 'the license file')}")
    return "\n".join(lines) + "\n"


def _yaml(value) -> str:
    """A YAML scalar: JSON strings and numbers are valid YAML and need no escaping rules of their own."""
    return json.dumps(value)


def compose(*, model_key: str, reference: str, context_size: int) -> str:
    """A Compose file with a top-level `models:` entry and one service bound to it."""
    return (
        "# Docker Compose with Docker Model Runner: `docker compose up` pulls the model and gives the\n"
        "# service its URL and name in the variables below. Replace the image with your own service.\n"
        "services:\n"
        "  app:\n"
        "    image: alpine:3\n"
        "    command: [\"sh\", \"-c\", \"echo model $$MODEL_NAME at $$MODEL_URL\"]\n"
        "    models:\n"
        f"      {model_key}:\n"
        "        endpoint_var: MODEL_URL\n"
        "        model_var: MODEL_NAME\n"
        "models:\n"
        f"  {model_key}:\n"
        f"    model: {_yaml(reference)}\n"
        f"    context_size: {context_size}\n"
    )
