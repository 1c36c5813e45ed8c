"""Jinja chat templates that render exactly what ``gracevlm.models.llava.chat.render_prompt`` renders.

Messages follow the transformers convention: ``content`` is a string, or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image"}`` (``image_url`` counts as an image too). A list
becomes what gracevlm's chat API builds: the texts joined with ``"\\n"``, and - when the text has no
``<image>`` of its own - one ``"<image>\\n"`` per image in front (``prepare_user_text``). With
``add_generation_prompt`` the empty assistant slot (``"ASSISTANT:"``) is appended. System messages are
refused, as in gracevlm: LLaVA-1.5's system prompt is part of the template.

Only constructs shared by jinja2 and llama.cpp's template engine are used (no string repetition,
no filters beyond ``join``).
"""
from __future__ import annotations

import json

from ..models.llava.chat import IMAGE_TOKEN, SeparatorStyle, get_template


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


_CONTENT = """{%- if message['content'] is string -%}
{%- set text = message['content'] -%}
{%- else -%}
{%- set ns = namespace(images=0, texts=[]) -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}
{%- set ns.images = ns.images + 1 -%}
{%- elif part['type'] == 'text' and part['text'] -%}
{%- set ns.texts = ns.texts + [part['text']] -%}
{%- endif -%}
{%- endfor -%}
{%- set text = ns.texts | join(NL) -%}
{%- if ns.images > 0 and IMG not in text -%}
{%- set pre = namespace(s='') -%}
{%- for i in range(ns.images) -%}{%- set pre.s = pre.s + IMG + NL -%}{%- endfor -%}
{%- set text = pre.s + text -%}
{%- endif -%}
{%- endif -%}"""


def chat_template(name: str = "vicuna_v1", bos: str | None = None) -> str:
    """The Jinja template of gracevlm's conversation template ``name``.

    ``bos`` (the BOS token's text, e.g. ``"<s>"``): rendered first, as a literal (not the ``bos_token``
    variable, which some renderers do not pass). For readers that tokenize the rendered chat without adding
    special tokens - vLLM's and SGLang's OpenAI chat, transformers' ``tokenizer.apply_chat_template(...,
    tokenize=True)`` - with a tokenizer that does not add BOS itself; see ``export.hf``. None: no BOS in the
    text (llama.cpp, whose tokenizer adds it)."""
    t = get_template(name)
    head = (f"{{%- set NL = {_lit(chr(10))} -%}}{{%- set IMG = {_lit(IMAGE_TOKEN)} -%}}"
            f"{{%- set SYSTEM = {_lit(t.system)} -%}}")
    if bos:
        head += f"{{{{- {_lit(bos)} -}}}}"
    checks = ("{%- if message['role'] == 'system' -%}"
              "{{- raise_exception('system messages are not supported: the LLaVA-1.5 template has a fixed "
              "system prompt') -}}"
              "{%- endif -%}"
              "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
              "{{- raise_exception('roles must alternate user/assistant starting with user') -}}"
              "{%- endif -%}")
    if t.sep_style is SeparatorStyle.TWO:
        body = (f"{{{{- SYSTEM + {_lit(t.sep)} -}}}}"
                "{%- for message in messages -%}" + checks + _CONTENT +
                "{%- if message['role'] == 'user' -%}"
                f"{{{{- {_lit(t.roles[0] + ': ')} + text + {_lit(t.sep)} -}}}}"
                "{%- elif text -%}"
                f"{{{{- {_lit(t.roles[1] + ': ')} + text + {_lit(t.sep2)} -}}}}"
                "{%- else -%}"
                f"{{{{- {_lit(t.roles[1] + ':')} -}}}}"
                "{%- endif -%}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}"
                f"{{{{- {_lit(t.roles[1] + ':')} -}}}}"
                "{%- endif -%}")
    else:  # PLAIN: every non-empty message is followed by its separator; no roles, no system text
        body = ("{{- SYSTEM -}}"
                "{%- for message in messages -%}" + checks + _CONTENT +
                "{%- if text -%}"
                f"{{%- if message['role'] == 'user' -%}}{{{{- text + {_lit(t.sep)} -}}}}"
                f"{{%- else -%}}{{{{- text + {_lit(t.sep2)} -}}}}{{%- endif -%}}"
                "{%- endif -%}"
                "{%- endfor -%}")
    return head + body
