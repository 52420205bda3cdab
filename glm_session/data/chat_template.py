"""A template as a Hugging Face chat template: the Jinja text and the tokenizer setting that make
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` give, id for id, the inference prompt that
``Template.render_prompt`` and the project's segment-wise encoding give (so vLLM, TGI or plain transformers prompt an
exported model as it was trained).

Two things make ids, not only texts, equal:

- the project encodes a prompt segment by segment (system text, each question with its role markers, each answer,
  each separator), so a BPE merge never crosses a segment's edge. The exported tokenizer gets a pre-tokenizer that
  cuts a text at the same edges (``segment_pattern``): where a question's markers start and end, and before a
  separator that precedes a question;
- the prefix ``[gMASK] sop`` and ``chatglm2_article``'s in-context eos are written in the Jinja text as token strings,
  so the exported tokenizer reads special-token strings as the special tokens (``split_special_tokens=False``, as
  chat tokenizers do), not as text the way SentencePiece does.

A question that itself holds ``"\\n\\n答："``, or an answer that holds a whole ``"[Round n]\\n\\n问：…"``, would be cut
elsewhere than its segment; ``export`` checks the result on probe conversations and the tests on every KdConv turn.
"""

from __future__ import annotations

import re

from glm_session.data.template import PLAIN, Template

QUESTION_FIELD, ROUND_FIELD, SYSTEM_FIELD = "{question}", "{round}", "{system}"


class ChatTemplateError(ValueError):
    """A template that has no chat form (``plain``) or whose formats this module cannot translate."""


def _literal(text: str) -> str:
    """``text`` as Jinja output: a string expression, so that braces and ``{%`` in it stay text."""
    return "{{ " + repr(text) + " }}" if text else ""


def _check(template: Template) -> None:
    if template.name == PLAIN.name:
        raise ChatTemplateError("template 'plain' writes documents, not dialogues: it has no chat template")
    user = template.user_format
    if (
        user.count(QUESTION_FIELD) != 1
        or user.count(ROUND_FIELD) != 1
        or user.index(ROUND_FIELD) > user.index(QUESTION_FIELD)
    ):
        raise ChatTemplateError(
            f"template {template.name!r}: user_format {user!r} is not '…{{round}}…{{question}}…'"
        )
    if template.system_format.count(SYSTEM_FIELD) != 1 or not template.system_format.startswith(SYSTEM_FIELD):
        raise ChatTemplateError(f"template {template.name!r}: system_format {template.system_format!r}")


def jinja_chat_template(template: Template, prefix: str, eos_token: str) -> str:
    """The Jinja chat template of ``template``: ``prefix`` (``"[gMASK]sop"``), the system text, then each user message
    as a question (rounds numbered from ``template.first_round``) and each assistant message as an answer followed
    by its stop: eos when ``eos_in_context`` or when it is the last message, the separator otherwise (``render_turns``
    with ``closed=True``: a whole training sample). The question's markers end with ``答：``, so the generation
    prompt adds nothing."""
    _check(template)
    before_round, rest = template.user_format.split(ROUND_FIELD)
    between, after_question = rest.split(QUESTION_FIELD)
    system_suffix = template.system_format[len(SYSTEM_FIELD) :]
    if template.eos_in_context:
        stop = _literal(template.answer_suffix + eos_token)
    else:
        stop = (
            _literal(template.answer_suffix)
            + "{% if loop.last %}"
            + _literal(eos_token)
            + "{% else %}"
            + _literal(template.separator)
            + "{% endif %}"
        )
    return (
        _literal(prefix)
        + f"{{% set ns = namespace(round={template.first_round}) %}}"
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}"
        + "{% if not loop.first %}{{ raise_exception('a system message comes first or not at all') }}{% endif %}"
        + "{{ message['content'] }}"
        + _literal(system_suffix)
        + "{% elif message['role'] == 'user' %}"
        + _literal(before_round)
        + "{{ ns.round }}"
        + _literal(between)
        + "{{ message['content'] }}"
        + _literal(after_question)
        + "{% set ns.round = ns.round + 1 %}"
        + "{% elif message['role'] == 'assistant' %}"
        + "{{ message['content'] }}"
        + stop
        + "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
        + "{% endif %}"
        + "{% endfor %}"
    )


def segment_pattern(template: Template) -> str:
    """A regex whose matches and the text between them are ``template``'s segments in a prompt's text (between
    special tokens): a question with its markers, a system text with its suffix at the start, a separator before
    a question; answers are what lies between."""
    _check(template)
    before_round, rest = template.user_format.split(ROUND_FIELD)
    between, after_question = rest.split(QUESTION_FIELD)
    question = rf"{re.escape(before_round)}\d+{re.escape(between)}[\s\S]*?{re.escape(after_question)}"
    system = rf"\A[\s\S]*?{re.escape(template.system_format[len(SYSTEM_FIELD) :])}(?={question})"
    separator = rf"{re.escape(template.separator)}(?={question})"
    return f"{question}|{system}|{separator}"


def add_chat_template(fast, template: Template, prefix: str, eos_token: str) -> None:
    """Give the fast tokenizer ``fast`` the chat template of ``template`` and the settings it needs (above)."""
    from tokenizers import Regex, pre_tokenizers

    fast.chat_template = jinja_chat_template(template, prefix, eos_token)
    backend = fast.backend_tokenizer
    splitter = pre_tokenizers.Split(Regex(segment_pattern(template)), behavior="isolated")
    backend.pre_tokenizer = (
        splitter if backend.pre_tokenizer is None else pre_tokenizers.Sequence([splitter, backend.pre_tokenizer])
    )
    fast.split_special_tokens = False


def chat_messages(history, query: str, system: str | None = None) -> list[dict[str, str]]:
    """``history`` (turns), then ``query``, as chat messages (``role``, ``content``), a system message first if
    ``system``: what ``apply_chat_template`` takes for the prompt ``Template.render_prompt(query, history, system)``."""
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history:
        messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
    return messages + [{"role": "user", "content": query}]
