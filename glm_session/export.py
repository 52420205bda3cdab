"""Export a training checkpoint as a Hugging Face folder: ``python -m glm_session.export CHECKPOINT DST``.

``CHECKPOINT`` is a run's single-file Lightning checkpoint (``<run>/checkpoints/last.ckpt`` or ``best-*.ckpt``; a
sharded ``trainer=fsdp`` checkpoint folder is made one file by ``python -m
lightning.fabric.utilities.consolidate_checkpoint FOLDER``, which writes ``FOLDER.consolidated``).
``DST`` gets what plain transformers loads, with no glm_session and no ``trust_remote_code``:

- ``config.json``, ``model.safetensors`` and ``generation_config.json`` (eos 2, pad 0) of ``GlmForCausalLM``;
- ``tokenizer.json`` and ``tokenizer_config.json``: a fast tokenizer (``AutoTokenizer``) whose ids are
  ``ChatGLM2Tokenizer.encode``'s: ``[gMASK] sop`` in front (a ``TemplateProcessing`` post-processor), the
  SentencePiece ids of the text, the five special tokens after the SentencePiece vocabulary; and the chat template
  of the run's template (``chatglm2`` or ``chatglm2_article``; ``glm_session/data/chat_template.py``), so that
  ``apply_chat_template(messages, add_generation_prompt=True)`` gives the run's inference prompt id for id (vLLM and
  TGI serve the folder with it). For that the tokenizer cuts a text at the template's segment edges, as the project
  encodes, and reads special-token strings in a text as the special tokens, as chat tokenizers do (SentencePiece
  reads them as text; transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``, where it exists,
  keeps them text inside messages);
- ``tokenizer.model``, so that ``ChatGLM2Tokenizer.from_pretrained(DST)`` loads too;
- ``glm_session.json``: what the run recorded (template, strategy, reduction, tokenizer fingerprint, ...), so the
  model is prompted in the format it was trained on.

A LoRA run (``peft=lora``) exports its base with the adapters merged in (a plain ``GlmForCausalLM`` folder, as
above), or with ``--adapter`` its adapters alone: ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(<the base>, DST)`` loads, and which ``model.init_from=<base>
model.init_adapter=DST`` continues training from.

The fast tokenizer is built from the SentencePiece model's own settings (transformers'
``SpmConverter.build_tokenizer_from_spm_proto``; reading the model needs ``protobuf``) and checked against
``ChatGLM2Tokenizer`` on ``PROBE_TEXTS``, its chat template against the project's prompts on
``PROBE_CONVERSATIONS``, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig, PreTrainedTokenizerFast

from glm_session.atomic_files import new_folder
from glm_session.checkpoints import load_model, model_state, read_checkpoint, run_info_of
from glm_session.data.chat_template import add_chat_template, chat_messages
from glm_session.data.samples import SegmentEncoder
from glm_session.data.session import Turn
from glm_session.data.template import PLAIN, TEMPLATES, Template, get_template, prompt_text
from glm_session.errors import CommandLineParser, UserError, cli_errors
from glm_session.evaluation.generation import vocabulary_padding
from glm_session.run_info import RunInfo
from glm_session.tokenizer import PREFIX_TOKENS, SPECIAL_TOKENS, VOCAB_FILE, ChatGLM2Tokenizer

INFO_FILE = "glm_session.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Texts the exported tokenizer must encode exactly as ChatGLM2Tokenizer does: Chinese, English, digits, spaces,
# newlines and tabs, byte fallback, special-token strings, and both templates' prompts with their role markers.
PROBE_TEXTS = [
    "你好",
    "Hello, world! 2023年7月1日，气温35.5°C。",
    "  two leading spaces, two  inner,\ttab and trailing  ",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "emoji 😀, accents é ü, full width ＡＢＣ１２３",
    "[gMASK]sop</s><s><unk>[MASK] eop",
    *(
        prompt_text(template.render_prompt("谁导演的？", [Turn("你知道《泰坦尼克号》吗？", "知道，1997年上映。")]))
        for template in TEMPLATES.values()
    ),
]


# Conversations whose chat-template ids must be the project's prompt ids (with and without a system text).
PROBE_CONVERSATIONS = [
    (None, [Turn("你知道《泰坦尼克号》吗？", "知道，1997年上映。")], "谁导演的？"),
    ("你是一个乐于助人的助手。", [Turn("Hi  there!\n", "  你好！\t"), Turn("1+1=?", "2。")], "谢谢 😀"),
]


class ExportError(UserError):
    """A checkpoint or tokenizer that cannot be exported; the message names the file and the reason."""


def fast_tokenizer(tokenizer: ChatGLM2Tokenizer) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` whose ids are ``tokenizer``'s, built from its SentencePiece model."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    try:
        extractor = SentencePieceExtractor(str(tokenizer.vocab_file))
    except ImportError:  # transformers reads the SentencePiece model with protobuf
        raise ExportError(f"{tokenizer.vocab_file}: converting it needs protobuf (pip install protobuf)") from None
    proto, merges = extractor.proto, None
    if proto.trainer_spec.model_type == 2:  # BPE: the vocabulary and its merges, in the pieces' score order
        extracted = extractor.extract(None)
        vocab: Any = extracted["vocab"]
        merges = extracted["merges"]  # given explicitly: transformers 5.17 does not derive them (characters only)
    else:  # unigram: pieces and scores
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges)
    if backend is None:
        raise ExportError(f"{tokenizer.vocab_file}: a SentencePiece model type that transformers cannot convert")
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if any(backend.token_to_id(token) != i for token, i in ids.items()):
        raise ExportError(f"{tokenizer.vocab_file}: the special tokens do not get ids {list(ids.values())}")
    eos = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id)
    prefix = " ".join(PREFIX_TOKENS)
    backend.post_processor = processors.TemplateProcessing(  # as ChatGLM2's build_inputs_with_special_tokens
        single=f"{prefix} $A",
        pair=f"{prefix} $A $B {eos}",
        special_tokens=[*((token, ids[token]) for token in PREFIX_TOKENS), (eos, tokenizer.eos_token_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id),
        unk_token=tokenizer.convert_ids_to_tokens(tokenizer.sp.unk_id()),
        additional_special_tokens=list(SPECIAL_TOKENS),
        split_special_tokens=True,  # "[gMASK]" typed in a text is text, as for SentencePiece
        padding_side="left",  # for batched generation
    )


def check_tokenizer(fast: PreTrainedTokenizerFast, tokenizer: ChatGLM2Tokenizer, texts: list[str]) -> None:
    """Raise ``ExportError`` on the first text that ``fast`` and ``tokenizer`` encode differently."""
    for text in texts:
        expected, got = tokenizer.encode(text), fast(text)["input_ids"]
        if got != expected:
            raise ExportError(
                f"{tokenizer.vocab_file}: the converted tokenizer encodes {text!r} as {got}, "
                f"ChatGLM2Tokenizer as {expected}"
            )


def check_chat_template(
    fast: PreTrainedTokenizerFast,
    tokenizer: ChatGLM2Tokenizer,
    template: Template,
    conversations: list[tuple[str | None, list[Turn], str]],
) -> None:
    """Raise ``ExportError`` on the first conversation whose ``apply_chat_template`` ids are not the ids of
    ``template.render_prompt`` encoded segment by segment (what evaluation and training feed the model)."""
    encode = SegmentEncoder(tokenizer)
    for system, history, query in conversations:
        expected = [i for segment in template.render_prompt(query, history, system) for i in encode(segment)]
        messages = chat_messages(history, query, system)
        got = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if got != expected:
            raise ExportError(
                f"{tokenizer.vocab_file}: the chat template of {template.name!r} gives {got} for "
                f"{messages}, the template's prompt is {expected}; export without it: --no-chat-template"
            )


def run_tokenizer(checkpoint: Path, info: RunInfo) -> ChatGLM2Tokenizer:
    """The tokenizer the run that wrote ``checkpoint`` recorded (``tokenizer_path``; ``None``: the bundled one).
    Checkpoints of earlier versions did not record it: then ``tokenizer.path`` of ``<run>/config.yaml``."""
    path, source = info.tokenizer_path, f"{checkpoint} (tokenizer_path)"
    config = checkpoint.parent.parent / "config.yaml"
    if path is None and config.is_file():
        try:
            path, source = OmegaConf.select(OmegaConf.load(config), "tokenizer.path"), str(config)
        except Exception as err:  # YAML and OmegaConf errors
            raise ExportError(f"{config}: not a readable run config ({err})") from None
    try:
        return ChatGLM2Tokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(f"{source}: tokenizer {path} does not load ({err})") from None


def export(
    checkpoint: str | Path,
    dst: str | Path,
    tokenizer: ChatGLM2Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    adapter: bool = False,
    chat_template: bool = True,
) -> Path:
    """Write the model of a training checkpoint, its tokenizer and its run's metadata as a Hugging Face folder.

    Args:
        checkpoint: a single-file Lightning checkpoint of ``glm_session.train``.
        dst: the folder to write; it must not exist or be empty. It is written under a temporary name beside it
            and renamed when whole, so a failed export (a full disk) leaves nothing that blocks a retry.
        tokenizer: the run's tokenizer; ``None``: the one its ``config.yaml`` names (or the bundled one). Its
            fingerprint must be the checkpoint's.
        dtype: the dtype of the written weights; ``None``: the checkpoint's (fp32).
        adapter: a LoRA run's adapters alone (``export_adapter``), instead of its base with them merged in.
        chat_template: write the run's template as the tokenizer's chat template (checked id for id on
            ``PROBE_CONVERSATIONS``); ``False``: the tokenizer as ``ChatGLM2Tokenizer`` alone, without one.

    Returns:
        ``dst``.

    Raises:
        ExportError: an unreadable checkpoint, another tokenizer than the run's, or a non-empty ``dst``.
    """
    checkpoint, dst = Path(checkpoint), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ExportError(f"{dst}: exists and is not an empty folder")
    if adapter:
        return export_adapter(checkpoint, dst, tokenizer, dtype, chat_template)
    model, info = load_model(checkpoint)
    tokenizer = tokenizer or run_tokenizer(checkpoint, info)
    fast = checked_fast_tokenizer(checkpoint, info, tokenizer, chat_template)
    if dtype is not None:
        model.to(dtype)
    model.generation_config = GenerationConfig(  # the vocabulary's padding ids decode to nothing: never generated
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=vocabulary_padding(tokenizer, model.config.vocab_size) or None,
    )
    metadata = {key: value for key, value in info.to_dict().items() if key != "model_config"}  # config.json has it
    with new_folder(dst, "export") as folder:  # renamed to dst once whole: a failure leaves nothing behind
        model.save_pretrained(folder)
        fast.save_pretrained(folder)
        (folder / VOCAB_FILE).write_bytes(tokenizer.sp.serialized_model_proto())  # for ChatGLM2Tokenizer
        (folder / INFO_FILE).write_text(json.dumps({**metadata, "checkpoint": str(checkpoint)}, indent=2) + "\n")
    return dst


def checked_fast_tokenizer(
    checkpoint: Path, info: RunInfo, tokenizer: ChatGLM2Tokenizer, chat_template: bool
) -> PreTrainedTokenizerFast:
    """The run's tokenizer as a fast tokenizer that encodes as it does (checked on ``PROBE_TEXTS``), with the run's
    template as its chat template (checked on ``PROBE_CONVERSATIONS``) unless ``chat_template`` is false."""
    if tokenizer.fingerprint != info.tokenizer_fingerprint:
        raise ExportError(
            f"{checkpoint}: trained with tokenizer {info.tokenizer_fingerprint}, not with "
            f"{tokenizer.vocab_file} ({tokenizer.fingerprint}); pass the run's with --tokenizer"
        )
    fast = fast_tokenizer(tokenizer)
    check_tokenizer(fast, tokenizer, PROBE_TEXTS)
    if chat_template and info.template != PLAIN.name:  # plain text has no dialogue, so no chat template
        add_chat_template(fast, get_template(info.template), "".join(PREFIX_TOKENS), fast.eos_token)
        check_chat_template(fast, tokenizer, get_template(info.template), PROBE_CONVERSATIONS)
    return fast


def export_adapter(
    checkpoint: Path,
    dst: Path,
    tokenizer: ChatGLM2Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    chat_template: bool = True,
) -> Path:
    """Write a LoRA run's adapters as peft writes them (``adapter_config.json``, ``adapter_model.safetensors``:
    ``PeftModel.from_pretrained(base, dst)`` loads them; ``dtype``: of the adapter weights, default the
    checkpoint's), with the run's tokenizer as the merged export writes it (``AutoTokenizer`` loads it) and its
    record."""
    from safetensors.torch import save_file

    from glm_session.adapters import peft_config, peft_names, settings_of

    state = read_checkpoint(checkpoint)
    info = run_info_of(state, checkpoint)
    if not info.peft:
        raise ExportError(f"{checkpoint}: a full fine-tuning run has no adapters to export; leave out --adapter")
    tokenizer = tokenizer or run_tokenizer(checkpoint, info)
    fast = checked_fast_tokenizer(checkpoint, info, tokenizer, chat_template)
    if not info.init_from:
        raise ExportError(f"{checkpoint}: LoRA adapters without a recorded base (model.init_from): peft could not "
                          "load them onto the base they were trained on")  # fmt: skip
    try:
        config = peft_config(settings_of(info.peft))
    except ValueError as err:
        raise ExportError(f"{checkpoint}: {err}") from None
    config.base_model_name_or_path = info.init_from
    metadata = {key: value for key, value in info.to_dict().items() if key != "model_config"}
    with new_folder(dst, "export") as folder:
        config.save_pretrained(folder)
        weights = {k: v.to(dtype or v.dtype).contiguous() for k, v in peft_names(model_state(state, checkpoint)).items()}
        save_file(weights, folder / "adapter_model.safetensors")
        fast.save_pretrained(folder)
        (folder / VOCAB_FILE).write_bytes(tokenizer.sp.serialized_model_proto())
        (folder / INFO_FILE).write_text(json.dumps({**metadata, "checkpoint": str(checkpoint)}, indent=2) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="glm_session.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoint file, e.g. <run>/checkpoints/last.ckpt")
    parser.add_argument("dst", type=Path, help="new folder for transformers' from_pretrained")
    parser.add_argument("--tokenizer", type=Path, help="the run's tokenizer.model or folder (default: the run's)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: the checkpoint's)")
    parser.add_argument("--adapter", action="store_true", help="a LoRA run's adapters alone (peft's folder)")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="write the tokenizer without a chat template"
    )
    args = parser.parse_args(argv)
    with cli_errors():
        tokenizer = ChatGLM2Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        dst = export(
            args.checkpoint, args.dst, tokenizer, DTYPES[args.dtype] if args.dtype else None, args.adapter,
            not args.no_chat_template,
        )  # fmt: skip
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
