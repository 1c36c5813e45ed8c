"""Jinja chat templates that render exactly what ``gracevlm.models.llava.chat.render_prompt`` renders.

Messages follow the transformers convention: ``content`` is a string, or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image"}`` (``image_url`` counts as an image too). A list
becomes what gracevlm's chat API builds: the texts joined with ``"\\n"``, and - when the text has no
``<image>`` of its own - one ``"<image>\\n"`` per image in front (``prepare_user_text``). With
``add_generation_prompt`` the empty assistant slot (``"ASSISTANT:"``) is appended. A leading system message
replaces the template's system text, as in gracevlm (its text parts joined with ``"\n"``); a system message
anywhere else, or any with the ``plain`` template (no system slot), is refused.

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
    two = t.sep_style is SeparatorStyle.TWO
    # a leading system message (TWO style only) replaces SYSTEM; the other messages start at ``sys.start``
    system = ("{%- set sys = namespace(text=SYSTEM, start=0) -%}"
              "{%- if messages and messages[0]['role'] == 'system' -%}"
              "{%- set sys.start = 1 -%}"
              "{%- if messages[0]['content'] is string -%}{%- set sys.text = messages[0]['content'] -%}"
              "{%- else -%}{%- set parts = namespace(texts=[]) -%}"
              "{%- for part in messages[0]['content'] -%}"
              "{%- if part['type'] == 'text' -%}{%- set parts.texts = parts.texts + [part['text']] -%}{%- endif -%}"
              "{%- endfor -%}{%- set sys.text = parts.texts | join(NL) -%}{%- endif -%}"
              "{%- endif -%}") if two else "{%- set sys = namespace(text=SYSTEM, start=0) -%}"
    checks = ("{%- if message['role'] == 'system' -%}"
              "{{- raise_exception('a system message must come first, and only once" +
              ("" if two else " (this template has no system slot)") + "') -}}"
              "{%- endif -%}"
              "{%- if (message['role'] == 'user') != ((loop.index0 - sys.start) % 2 == 0) -%}"
              "{{- raise_exception('roles must alternate user/assistant starting with user') -}}"
              "{%- endif -%}")
    loop_head = "{%- for message in messages -%}{%- if loop.index0 >= sys.start -%}"
    loop_tail = "{%- endif -%}{%- endfor -%}"
    if two:
        body = (system + f"{{{{- sys.text + {_lit(t.sep)} -}}}}" + loop_head + checks + _CONTENT +
                "{%- if message['role'] == 'user' -%}"
                f"{{{{- {_lit(t.roles[0] + ': ')} + text + {_lit(t.sep)} -}}}}"
                "{%- elif text -%}"
                f"{{{{- {_lit(t.roles[1] + ': ')} + text + {_lit(t.sep2)} -}}}}"
                "{%- else -%}"
                f"{{{{- {_lit(t.roles[1] + ':')} -}}}}"
                "{%- endif -%}" + loop_tail +
                "{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}"
                f"{{{{- {_lit(t.roles[1] + ':')} -}}}}"
                "{%- endif -%}")
    else:  # PLAIN: every non-empty message is followed by its separator; no roles, no system text
        body = (system + "{{- SYSTEM -}}" + loop_head + checks + _CONTENT +
                "{%- if text -%}"
                f"{{%- if message['role'] == 'user' -%}}{{{{- text + {_lit(t.sep)} -}}}}"
                f"{{%- else -%}}{{{{- text + {_lit(t.sep2)} -}}}}{{%- endif -%}}"
                "{%- endif -%}" + loop_tail)
    return head + body
