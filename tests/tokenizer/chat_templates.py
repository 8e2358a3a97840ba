"""Chat templates written the way real checkpoints write them (ChatML, Llama-3, Mistral
styles), shared by the tokenizer and serving tests; a module with a unique name so that
tests can import it whatever other conftest.py files are loaded."""

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]"]

# Qwen-like ChatML: a default system turn, whitespace control, tools rendered with tojson.
CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- set rest = messages[1:] %}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- set rest = messages %}
{%- endif %}
{%- if tools %}{{ tools | tojson }}{% endif %}
{%- for message in rest %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.content is defined %}{{ message.content }}{% endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3-style: BOS from the config, trimmed content, a date from strftime_now, and plain
# (not dash-trimmed) block tags so that trim_blocks / lstrip_blocks decide the whitespace.
LLAMA3 = """{{ bos_token }}
{% set date = strftime_now("%d %b %Y") %}
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|start_header_id|>system<|end_header_id|>

Today Date: {{ date }}<|eot_id|>
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# Mistral-style: strict alternation enforced with raise_exception; tojson of a field; loop
# controls; a {% generation %} block around assistant text; a namespace counter.
MISTRAL = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}
    {%- endif %}
    {%- if message.get('name') %}{{ message['name'] | tojson }}{% endif %}
    {%- if ns.turns > 3 %}{% break %}{% endif %}
{%- endfor %}"""
