"""Convert an original THUDM ChatGLM2 checkpoint: ``python -m glm_session.convert SRC DST [--dtype bfloat16]``.

``SRC`` is a ChatGLM2-6B folder as THUDM publishes it: ``config.json`` (the original fields: ``num_layers``,
``hidden_size``, ``kv_channels``, ``multi_query_group_num``, ``padded_vocab_size``, ...), the weights (sharded or
single ``pytorch_model*.bin``, or ``*.safetensors``, with their index) and ``tokenizer.model``. ``DST`` becomes a
folder that ``GlmForCausalLM.from_pretrained`` and ``ChatGLM2Tokenizer.from_pretrained`` load, and that training
takes as ``model.init_from``.

The tensors map onto ``GlmForCausalLM`` as DESIGN.md §1 says: ``query_key_value`` is split by rows into q, k and v
(q = [0:H], k = [H:H+kv], v = [H+kv:H+2kv], kv = groups x head dim), ``dense_h_to_4h`` is ``gate_up_proj`` as it
is, ``dense_4h_to_h`` is ``down_proj``, ``final_layernorm`` is ``norm``, ``output_layer`` is ``lm_head``, and the
rotary ``inv_freq`` is dropped (transformers computes it). Every source tensor must be used and every parameter
filled, with its exact shape; anything else is a ``ConversionError`` naming the file and the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import GlmConfig, GlmForCausalLM

from glm_session.errors import CommandLineParser, UserError, cli_errors
from glm_session.model.presets import chatglm2_config
from glm_session.tokenizer import VOCAB_FILE, ChatGLM2Tokenizer

CONFIG_FILE = "config.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DROPPED = "transformer.rotary_pos_emb.inv_freq"
# Original name -> GlmForCausalLM name; "{i}" is the layer. query_key_value is split by ``_split_qkv``.
LAYER = r"transformer\.encoder\.layers\.(?P<i>\d+)\."
RENAMES = [
    (r"transformer\.embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (LAYER + r"input_layernorm\.weight", "model.layers.{i}.input_layernorm.weight"),
    (LAYER + r"self_attention\.dense\.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    (LAYER + r"post_attention_layernorm\.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    (LAYER + r"mlp\.dense_h_to_4h\.weight", "model.layers.{i}.mlp.gate_up_proj.weight"),
    (LAYER + r"mlp\.dense_4h_to_h\.weight", "model.layers.{i}.mlp.down_proj.weight"),
    (r"transformer\.encoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"transformer\.output_layer\.weight", "lm_head.weight"),
]
QKV = re.compile(LAYER + r"self_attention\.query_key_value\.(?P<kind>weight|bias)")
# Original options whose other values GlmForCausalLM does not compute: (name, required value if present).
FIXED_OPTIONS = [
    ("rmsnorm", True),
    ("add_bias_linear", False),
    ("apply_residual_connection_post_layernorm", False),
    ("post_layer_norm", True),
    ("rope_ratio", 1),
]


class ConversionError(UserError):
    """A source that cannot be converted; the message names the file and the reason."""


FILE_NAMES = {  # GlmConfig's name -> the original config.json's
    "vocab_size": "padded_vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "multi_query_group_num",
    "head_dim": "kv_channels",
    "max_position_embeddings": "seq_length",
    "rms_norm_eps": "layernorm_epsilon",
    "attention_bias": "add_qkv_bias",
}


def read_config(src: Path) -> GlmConfig:
    """The ``GlmConfig`` of an original ChatGLM2 ``config.json``: ``chatglm2_config`` with the file's sizes."""
    path = src / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: missing (an original ChatGLM2 config.json is needed)")
    try:
        original: dict[str, Any] = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConversionError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(original, dict):
        raise ConversionError(f"{path}: holds a JSON {type(original).__name__}, not an object of config fields")
    for name, value in FIXED_OPTIONS:
        if name in original and original[name] != value:
            raise ConversionError(f"{path}: {name}={original[name]!r} is not supported (ChatGLM2 has {value!r})")
    try:
        heads = original["num_attention_heads"]
        sizes = {
            "vocab_size": original["padded_vocab_size"],
            "hidden_size": original["hidden_size"],
            "intermediate_size": original["ffn_hidden_size"],
            "num_hidden_layers": original["num_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": original["multi_query_group_num"] if original.get("multi_query_attention") else heads,
            "max_position_embeddings": original["seq_length"],
            "rms_norm_eps": original["layernorm_epsilon"],
            "attention_bias": original.get("add_qkv_bias", True),
        }
    except KeyError as err:
        raise ConversionError(f"{path}: no {err.args[0]!r} (not an original ChatGLM2 config)") from None
    if "kv_channels" in original:
        sizes["head_dim"] = original["kv_channels"]
    for name, value in sizes.items():
        kind = {"rms_norm_eps": (int, float), "attention_bias": bool}.get(name, int)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConversionError(f"{path}: {FILE_NAMES[name]}={value!r}, not a number of the right kind")
        if kind is not bool and not value > 0:  # a size of 0 divides by zero, a negative epsilon is no epsilon
            raise ConversionError(f"{path}: {FILE_NAMES[name]}={value!r}; it must be above 0")
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise ConversionError(
            f"{path}: {sizes['num_attention_heads']} attention heads do not form groups of "
            f"multi_query_group_num={sizes['num_key_value_heads']} (each key-value head serves a whole group)"
        )
    sizes.setdefault("head_dim", sizes["hidden_size"] // heads)
    if not sizes["head_dim"] > 0:
        raise ConversionError(f"{path}: hidden_size {sizes['hidden_size']} over {heads} heads leaves no head dimension")
    for token in ("eos_token_id", "pad_token_id"):
        value = original.get(token)
        if value is None:
            continue
        if type(value) is not int or not 0 <= value < sizes["vocab_size"]:  # a traceback, or a model that never stops
            raise ConversionError(f"{path}: {token}={value!r}; it must be a token id, 0 to padded_vocab_size - 1 "
                                  f"({sizes['vocab_size'] - 1})")  # fmt: skip
        sizes[token] = value
    return chatglm2_config("chatglm2-6b", **sizes)


def weight_files(src: Path) -> list[Path]:
    """The weight files of ``src``: safetensors if there are any, else ``pytorch_model*.bin``; index first."""
    for index_name, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
                if not all(isinstance(name, str) for name in names):
                    raise TypeError("a file name that is not a string")
                outside = [name for name in names if Path(name).is_absolute() or ".." in Path(name).parts]
                if outside:
                    raise ValueError(f"{outside[0]} is not a file of the folder: an index names its own shards")
            except (OSError, UnicodeDecodeError, ValueError, LookupError, AttributeError, TypeError) as err:
                raise ConversionError(f"{index}: not a weight index with a 'weight_map' ({err!r})") from None
            missing = [name for name in names if not (src / name).is_file()]
            if missing:
                raise ConversionError(f"{index}: lists {', '.join(missing)}, which {src} lacks")
            return [src / name for name in names]
        if (src / single).is_file():
            return [src / single]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise ConversionError(f"{src}: no weights (pytorch_model*.bin or *.safetensors, with or without an index)")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file, read without executing code (safetensors, or ``weights_only`` pickles)."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: torch and safetensors raise many kinds
        raise ConversionError(f"{path}: cannot be read as weights ({type(err).__name__}: {err})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ConversionError(f"{path}: not a dictionary of tensors")
    for name, tensor in tensors.items():  # a model's weights are floating-point numbers, every one finite
        if not tensor.is_floating_point():
            raise ConversionError(f"{path}: tensor {name} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise ConversionError(f"{path}: tensor {name} holds {count} non-finite values")
    return tensors


def _split_qkv(
    name: str, tensor: torch.Tensor, layer: str, kind: str, config: GlmConfig
) -> dict[str, torch.Tensor]:
    """q, k and v of a fused ``query_key_value`` weight (rows) or bias."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    if tensor.dim() == 0:
        raise ValueError(f"{name} is a scalar, not rows of q, k and v")
    if tensor.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows, the config needs {q_rows} + 2 x {kv_rows} = {q_rows + 2 * kv_rows}"
        )
    parts = tensor.split([q_rows, kv_rows, kv_rows])  # views: cloned, or safetensors sees shared storage
    return {
        f"model.layers.{layer}.self_attn.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", parts, strict=True)
    }


def map_tensor(name: str, tensor: torch.Tensor, config: GlmConfig) -> dict[str, torch.Tensor]:
    """The ``GlmForCausalLM`` tensors of one original tensor (none for ``inv_freq``).

    Raises:
        KeyError: an unknown name.
        ValueError: a ``query_key_value`` whose rows do not match the config.
    """
    if name == DROPPED:
        return {}
    if match := QKV.fullmatch(name):
        return _split_qkv(name, tensor, match["i"], match["kind"], config)
    for pattern, target in RENAMES:
        if match := re.fullmatch(pattern, name):
            return {target.format(**match.groupdict()): tensor}
    raise KeyError(name)


def original_names(config: GlmConfig) -> list[str]:
    """The tensors an original checkpoint of ``config`` must have (``inv_freq`` may be there too)."""
    layer = [
        "input_layernorm.weight",
        "self_attention.query_key_value.weight",
        *(["self_attention.query_key_value.bias"] if config.attention_bias else []),
        "self_attention.dense.weight",
        "post_attention_layernorm.weight",
        "mlp.dense_h_to_4h.weight",
        "mlp.dense_4h_to_h.weight",
    ]
    return [
        "transformer.embedding.word_embeddings.weight",
        *(f"transformer.encoder.layers.{i}.{name}" for i in range(config.num_hidden_layers) for name in layer),
        "transformer.encoder.final_layernorm.weight",
        "transformer.output_layer.weight",
    ]


def original_tensors(files: list[Path], config: GlmConfig) -> Iterator[tuple[Path, str, str, torch.Tensor]]:
    """``(file, original name, GlmForCausalLM name, tensor)`` of every mapped tensor, reading one file at a time."""
    seen: dict[str, Path] = {}
    for path in files:
        for name, tensor in load_weights(path).items():
            if name in seen:
                raise ConversionError(f"{path}: tensor {name} is also in {seen[name]}")
            seen[name] = path
            try:
                mapped = map_tensor(name, tensor, config)
            except KeyError:
                raise ConversionError(f"{path}: unknown tensor {name} (not part of ChatGLM2)") from None
            except ValueError as err:
                raise ConversionError(f"{path}: {err}") from None
            for target, value in mapped.items():
                yield path, name, target, value


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``src`` (an original ChatGLM2 folder) as a ``GlmForCausalLM`` folder with ``tokenizer.model`` to ``dst``.

    Args:
        src: the original folder (config.json, weights, tokenizer.model).
        dst: the folder to write; it must not exist or be empty.
        dtype: the dtype of the written weights; ``None``: the source's (that of its word embeddings).

    Returns:
        ``dst``.

    Raises:
        ConversionError: anything in ``src`` that does not convert exactly, or a non-empty ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"{dst}: exists and is not an empty folder")
    config = read_config(src)
    if not (src / VOCAB_FILE).is_file():
        raise ConversionError(f"{src / VOCAB_FILE}: missing (ChatGLM2's SentencePiece model is needed)")
    try:
        tokenizer = ChatGLM2Tokenizer.from_pretrained(src)
    except ValueError as err:  # names the file
        raise ConversionError(str(err)) from None
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(
            f"{src / VOCAB_FILE}: {len(tokenizer)} tokens do not fit padded_vocab_size={config.vocab_size}"
        )

    with torch.device("meta"):  # shapes only: the weights come from the source
        model = GlmForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    files = weight_files(src)
    found: set[str] = set()
    for path, original, name, tensor in original_tensors(files, config):
        found.add(original)
        if name not in expected:
            raise ConversionError(f"{path}: {original} does not fit {CONFIG_FILE}, whose model has no {name}")
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(
                f"{path}: {original} gives {name} of shape {tuple(tensor.shape)}, the config needs {expected[name]}"
            )
        state[name] = tensor
    for missing in (
        [name for name in original_names(config) if name not in found],
        sorted(set(expected) - set(state)),  # empty when the original names are complete: a second guard
    ):
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConversionError(f"{src}: no tensor {shown} in {', '.join(f.name for f in files)}")
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    state = {name: tensor.to(dtype) for name, tensor in state.items()}

    model.load_state_dict(state, assign=True)  # strict: every parameter is now a source tensor
    model.config.dtype = dtype
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="glm_session.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="original ChatGLM2 folder (config.json, weights, tokenizer.model)")
    parser.add_argument("dst", type=Path, help="new folder for GlmForCausalLM.from_pretrained")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: the source's)")
    args = parser.parse_args(argv)
    with cli_errors():
        dst = convert(args.src, args.dst, DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
