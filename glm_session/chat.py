"""Talk to a trained model: ``python -m glm_session.chat ckpt_path=<run>/checkpoints/last.ckpt`` or
``model_dir=<exported folder>`` (``conf/chat.yaml``; console script ``glm-session-chat``).

Each question is sent with the dialogue so far, rendered by the run's own template exactly as evaluation renders
it (``Template.render_prompt``, encoded segment by segment), and the answer is streamed as it is generated, with
``evaluate``'s generation settings (``generation=...``). A history too long for ``max_seq_len`` less
``generation.max_new_tokens`` loses its oldest turns first, by evaluation's rule (``prompt_history_start``), and the
chat says how many it dropped; a question that does not fit alone is not sent. Commands: ``/reset`` (a new
dialogue), ``/history`` (the turns kept so far), ``/exit`` or the end of the input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import hydra
import torch
from omegaconf import DictConfig

from glm_session.checkpoints import load_model, run_tokenizer
from glm_session.config import CONFIG_DIR, build, device_of
from glm_session.data.samples import SegmentEncoder, SessionLayout
from glm_session.data.session import Session, Turn
from glm_session.data.strategy import prompt_history_start
from glm_session.data.template import PLAIN, TEMPLATES, Template, get_template
from glm_session.errors import UserError, check_int
from glm_session.evaluation.generation import GenerationSettings, generation_attention, generation_options
from glm_session.export import INFO_FILE
from glm_session.hydra_jobs import job, run_app
from glm_session.tokenizer import ChatGLM2Tokenizer


class ChatError(UserError):
    """Bad chat input: no model, or a folder or checkpoint that is not one; the message names the file."""


class Chat:
    """A dialogue with ``model``: its turns so far, and the prompt of the next question."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: ChatGLM2Tokenizer,
        template: Template,
        generation: GenerationSettings,
        max_seq_len: int,
        system: str | None = None,
    ) -> None:
        generation.check_room(max_seq_len, tokenizer, template, room_key="max_seq_len")
        self.model, self.tokenizer, self.template, self.generation = model, tokenizer, template, generation
        self.budget, self.system = generation.prompt_budget(max_seq_len), system
        self.encode = SegmentEncoder(tokenizer)
        self.turns: list[Turn] = []

    def prompt(self, question: str) -> tuple[list[int] | None, int]:
        """The ids of ``question``'s prompt and how many of the oldest turns it leaves out; ``None`` ids when the
        question alone takes more than the prompt's budget."""
        session = Session("chat", (*self.turns, Turn(question, "")), self.system)
        start = prompt_history_start(
            SessionLayout(session, self.template, self.encode), len(self.turns), self.budget
        )
        if start is None:
            return None, len(self.turns)
        segments = self.template.render_prompt(question, self.turns[start:], self.system)
        return [i for segment in segments for i in self.encode(segment)], start

    @torch.no_grad()
    def reply(self, question: str, out: TextIO) -> str | None:
        """Generate the answer to ``question``, writing its text to ``out`` as it comes; ``None`` if not sent."""
        ids, dropped = self.prompt(question)
        if ids is None:
            out.write(f"(not sent: the question alone takes more than the prompt's {self.budget} tokens)\n")
            return None
        if dropped:
            out.write(f"(the oldest {dropped} turn(s) left out of the prompt: it holds {self.budget} tokens)\n")
        device = next(self.model.parameters()).device
        streamer = TextStream(self.tokenizer, out)
        options = generation_options(self.generation, self.tokenizer, self.model.config.vocab_size)
        with generation_attention(self.model):
            output = self.model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                **options,
            )[0, len(ids) :].tolist()
        if self.tokenizer.eos_token_id in output:
            output = output[: output.index(self.tokenizer.eos_token_id)]
        answer = self.tokenizer.decode(output, skip_special_tokens=True).strip()
        self.turns.append(Turn(question, answer))
        return answer


class TextStream:
    """A ``generate`` streamer that writes each new piece of the answer's text to ``out`` as soon as it decodes
    (the text so far is decoded again each token, so multi-token characters come out whole)."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written, self.prompt_seen, self.ended = "", False, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate sends the prompt first
            self.prompt_seen = True
            return
        for i in value.reshape(-1).tolist():
            if self.ended or i == self.tokenizer.eos_token_id:
                self.ended = True
                return
            self.ids.append(i)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an incomplete character waits for its next byte
            self.out.write(text[len(self.written) :])
            self.out.flush()
            self.written = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[len(self.written) :] + "\n")
        self.out.flush()


def load_chat_model(cfg: DictConfig) -> tuple[torch.nn.Module, ChatGLM2Tokenizer, Template, int]:
    """Model, tokenizer, template and the run's ``max_seq_len`` from ``cfg.ckpt_path`` or ``cfg.model_dir``."""
    room = check_int("max_seq_len", cfg.max_seq_len, minimum=1, optional=True)  # null: the run's
    if (cfg.ckpt_path is None) == (cfg.model_dir is None):
        raise ChatError(
            "chat: give ckpt_path=<run>/checkpoints/last.ckpt or model_dir=<exported folder> (one of them)"
        )
    if cfg.ckpt_path is not None:
        model, info = load_model(cfg.ckpt_path)
        tokenizer = run_tokenizer(cfg.ckpt_path, info)
        template_name, max_seq_len = info.template, info.max_seq_len
    else:
        folder = Path(cfg.model_dir)
        if not folder.is_dir():
            raise ChatError(f"{folder}: no such folder (model_dir= takes a folder written by glm_session.export)")
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise ChatError(f"{folder}: LoRA adapters alone (export --adapter); model_dir= takes a whole model: "
                            "export the run without --adapter, or give its checkpoint as ckpt_path=")  # fmt: skip
        if not (folder / "config.json").is_file():
            raise ChatError(f"{folder}: not a model folder (no config.json); model_dir= takes a folder written by "
                            "glm_session.export")  # fmt: skip
        if not (folder / INFO_FILE).is_file():
            raise ChatError(f"{folder}: no {INFO_FILE}, so the template the model was trained with is unknown; "
                            "export the run's checkpoint with python -m glm_session.export")  # fmt: skip
        try:
            info = json.loads((folder / INFO_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ChatError(f"{folder / INFO_FILE}: not readable JSON ({err})") from None
        if not isinstance(info, dict):
            raise ChatError(f"{folder / INFO_FILE}: holds a JSON {type(info).__name__}, not the run record that "
                            "glm_session.export writes")  # fmt: skip
        template_name, max_seq_len = info.get("template"), info.get("max_seq_len")
        if template_name is None:
            raise ChatError(f"{folder / INFO_FILE}: records no template; export the run's checkpoint again with "
                            "python -m glm_session.export")  # fmt: skip
        if template_name not in TEMPLATES:
            raise ChatError(f"{folder / INFO_FILE}: an unknown template {template_name!r} (one of "
                            f"{', '.join(TEMPLATES)}); export the run's checkpoint again")  # fmt: skip
        if max_seq_len is not None and (type(max_seq_len) is not int or max_seq_len < 1):
            raise ChatError(f"{folder / INFO_FILE}: max_seq_len {max_seq_len!r} is not a number of tokens; "
                            "export the run's checkpoint again, or give max_seq_len=N")  # fmt: skip
        from transformers import GlmForCausalLM

        try:
            model = GlmForCausalLM.from_pretrained(folder)
            tokenizer = ChatGLM2Tokenizer.from_pretrained(folder)
        except Exception as err:  # transformers and safetensors raise many kinds for damaged files
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise ChatError(f"{folder}: does not load ({type(err).__name__}: {first_line[:300]})") from None
    if template_name == PLAIN.name:
        raise ChatError(
            f"{cfg.ckpt_path or cfg.model_dir}: trained on plain text (template plain): no dialogue to chat"
        )
    return model.eval(), tokenizer, get_template(template_name), room or max_seq_len or 2048


def is_text(line: str) -> bool:
    """Whether ``line`` is Unicode text: bytes that are not UTF-8 reach it from stdin as lone surrogates."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def converse(chat: Chat, lines: Iterable[str], out: TextIO) -> None:
    """Answer each line of ``lines`` (a question or a command) until ``/exit`` or the end of the input."""
    out.write("chat: /reset starts a new dialogue, /history shows it, /exit ends\n")
    for line in lines:
        question = line.rstrip("\n")
        if not question.strip():
            continue
        if question.strip() == "/exit":
            break
        if question.strip() == "/reset":
            chat.turns.clear()
            out.write("(a new dialogue)\n")
        elif question.strip() == "/history":
            for k, turn in enumerate(chat.turns, 1):
                out.write(f"[{k}] 问：{turn.question}\n[{k}] 答：{turn.answer}\n")
            out.write(f"({len(chat.turns)} turn(s))\n")
        elif not is_text(question):
            out.write("(not sent: the line is not valid UTF-8 text)\n")
        else:
            out.write("答：")
            chat.reply(question, out)
        out.flush()


@hydra.main(config_path=str(CONFIG_DIR), config_name="chat", version_base="1.3")
@job
def hydra_app(cfg: DictConfig) -> None:
    model, tokenizer, template, max_seq_len = load_chat_model(cfg)
    chat = Chat(model.to(device_of(cfg.device)), tokenizer, template, build(cfg.generation), max_seq_len, cfg.system)
    converse(chat, sys.stdin, sys.stdout)


def main() -> None:
    """``python -m glm_session.chat`` / ``glm-session-chat``: bad input ends with one line and exit code 2."""
    run_app(hydra_app)


if __name__ == "__main__":
    main()
