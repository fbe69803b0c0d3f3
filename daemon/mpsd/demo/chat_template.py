"""The demo models' chat template, installed into a built demo model idempotently.

Both demo models share one tokenizer with one special token, so one small
template serves both: each message as "role: content" closed by the end-of-text
token, then "assistant:" for the reply. With tools it names them first (names
only: the MLX demo's context is 256 tokens; the grammar, not the prompt, holds
their schemas) and writes tool calls and results in the Hermes/Qwen form
(`<tool_call>` JSON `</tool_call>`, `<tool_response>`), so agents can be
tested end to end. Neither model was trained on
conversations; the template is there so the demo and the tests can chat
through the same path a real instruction-tuned model takes.

The template came after the first demo builds. Bumping the marker versions
would make every existing build retrain (about a minute each) to gain one text
file, so instead the daemon writes `chat_template.jinja` (the file
transformers and mlx-lm read beside the tokenizer) into a complete build
whenever it is missing or differs, atomically: a fresh build gets it the same
way, right after it is installed. Imports neither torch nor mlx.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

TEMPLATE_FILE = "chat_template.jinja"
DEMO_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- 'system: tools' }}"
    "{%- for tool in tools %}{{- ' ' + tool['function']['name'] }}{%- endfor %}"
    "{{- eos_token }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- 'tool: <tool_response>\\n' + message['content'] + '\\n</tool_response>' + eos_token }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{- 'assistant: ' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>\\n' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- eos_token }}"
    "{%- else %}"
    "{{- message['role'] + ': ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}"
)


def install_chat_template(model_dir: pathlib.Path) -> bool:
    """Writes the template unless the same one is there; True when it wrote it."""
    target = pathlib.Path(model_dir) / TEMPLATE_FILE
    try:
        if target.read_text(encoding="utf-8") == DEMO_CHAT_TEMPLATE:
            return False
    except OSError:
        pass
    handle, temporary = tempfile.mkstemp(prefix=f".{TEMPLATE_FILE}.", dir=model_dir)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(DEMO_CHAT_TEMPLATE)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other local users, like the model's files
        os.replace(temporary, target)  # a loading worker sees the old file or the whole new one
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    return True
