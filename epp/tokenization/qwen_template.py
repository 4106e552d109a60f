"""The ChatML chat template written into the generated Qwen3.5/3.6 ``tokenizer_config.json``.

Our own template in the layout Qwen models are trained on: each turn is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; tool signatures go into the system turn as
JSON lines inside ``<tools></tools>``; an assistant's tool calls follow its content as
``<tool_call>`` JSON; the generation prompt is ``<|im_start|>assistant\\n`` (with an empty
``<think></think>`` block when ``enable_thinking=False``). Content may be a string or a list
of OpenAI content parts (text, image, video, audio; media become Qwen's placeholder tokens).

It is a stand-in for tests and local runs: a deployment that routes for a real model should
load that model's own tokenizer directory, whose chat template is the one vLLM renders.
"""

from __future__ import annotations

QWEN_CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
  {%- if content is none -%}
  {%- elif content is string -%}
    {{- content -}}
  {%- else -%}
    {%- for part in content -%}
      {%- if part is string -%}
        {{- part -}}
      {%- elif part.type == 'text' -%}
        {{- part.text -}}
      {%- elif part.type in ('image', 'image_url') -%}
        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
      {%- elif part.type in ('video', 'video_url') -%}
        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
      {%- elif part.type in ('audio', 'input_audio', 'audio_url') -%}
        {{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}
      {%- else -%}
        {{- raise_exception('unsupported content part type: ' ~ part.type) -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}

{%- if not messages -%}
  {{- raise_exception('a conversation needs at least one message') -}}
{%- endif -%}
{%- set has_system = messages[0].role in ('system', 'developer') -%}

{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if has_system -%}
    {{- render_content(messages[0].content) ~ '\n\n' -}}
  {%- endif -%}
  {{- '# Tools\n\nFunctions you can call, one JSON signature per line inside <tools></tools>:\n<tools>' -}}
  {%- for tool in tools -%}
    {{- '\n' ~ (tool | tojson) -}}
  {%- endfor -%}
  {{- '\n</tools>\n\nTo call a function, reply with its name and arguments as a JSON object between <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
  {{- '<|im_start|>system\n' ~ render_content(messages[0].content) ~ '<|im_end|>\n' -}}
{%- endif -%}

{%- for message in messages -%}
  {%- if message.role is not defined or message.role is not string -%}
    {{- raise_exception('every message needs a role') -}}
  {%- elif message.role in ('system', 'developer') -%}
    {%- if not loop.first -%}
      {{- raise_exception('a system message must come first') -}}
    {%- endif -%}
  {%- elif message.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' ~ render_content(message.content) -}}
    {%- for call in message.tool_calls or [] -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {%- if not loop.first or message.content -%}
        {{- '\n' -}}
      {%- endif -%}
      {%- set arguments = fn.arguments if fn.arguments is string else (fn.arguments | default({}, true) | tojson) -%}
      {{- '<tool_call>\n{"name": ' ~ (fn.name | tojson) ~ ', "arguments": ' ~ arguments ~ '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ render_content(message.content) ~ '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>\n\n</think>\n\n' -}}
  {%- endif -%}
{%- endif -%}
""".strip()
