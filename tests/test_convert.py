"""glm_session.convert: a fake original ChatGLM2 checkpoint (the original names and shapes, random values, the
chatglm2-tiny sizes) lands tensor by tensor where DESIGN.md §1 says, loads, computes what an independently built
model computes, trains as model.init_from, and every bad input is an error that names the file and the tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GlmForCausalLM

from glm_session.config import compose_config
from glm_session.convert import ConversionError, convert, main
from glm_session.model import chatglm2_config, padded_vocab_size
from glm_session.tokenizer import ChatGLM2Tokenizer

LAYERS, HIDDEN, HEADS, HEAD_DIM, GROUPS, FFN = 2, 64, 4, 16, 2, 128  # the chatglm2-tiny preset


def original_config(vocab: int) -> dict:
    """THUDM/chatglm2-6b's config.json with the tiny sizes."""
    return {
        "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": FFN,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": HIDDEN, "kv_channels": HEAD_DIM,
        "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": GROUPS,
        "num_attention_heads": HEADS, "num_layers": LAYERS, "original_rope": True, "padded_vocab_size": vocab,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 4096, "use_cache": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.27.1", "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip


def original_state(vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors with ChatGLM2's names and shapes (query_key_value: 64 q + 32 k + 32 v rows)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.2).to(dtype)

    state = {"transformer.embedding.word_embeddings.weight": rand(vocab, HIDDEN)}
    for i in range(LAYERS):
        layer = f"transformer.encoder.layers.{i}."
        state[layer + "input_layernorm.weight"] = 1 + rand(HIDDEN)
        state[layer + "self_attention.query_key_value.weight"] = rand(HIDDEN + 2 * GROUPS * HEAD_DIM, HIDDEN)
        state[layer + "self_attention.query_key_value.bias"] = rand(HIDDEN + 2 * GROUPS * HEAD_DIM)
        state[layer + "self_attention.dense.weight"] = rand(HIDDEN, HIDDEN)
        state[layer + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN)
        state[layer + "mlp.dense_h_to_4h.weight"] = rand(2 * FFN, HIDDEN)
        state[layer + "mlp.dense_4h_to_h.weight"] = rand(HIDDEN, FFN)
    state["transformer.encoder.final_layernorm.weight"] = 1 + rand(HIDDEN)
    state["transformer.output_layer.weight"] = rand(vocab, HIDDEN)
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2).to(dtype) / 8)
    return state


def expected_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GlmForCausalLM tensors, written out by hand: q = rows 0:64, k = 64:96, v = 96:128."""
    expected = {
        "model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": state["transformer.output_layer.weight"],
    }
    for i in range(LAYERS):
        old, new = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        qkv_weight = state[old + "self_attention.query_key_value.weight"]
        qkv_bias = state[old + "self_attention.query_key_value.bias"]
        expected |= {
            new + "input_layernorm.weight": state[old + "input_layernorm.weight"],
            new + "self_attn.q_proj.weight": qkv_weight[0:64],
            new + "self_attn.k_proj.weight": qkv_weight[64:96],
            new + "self_attn.v_proj.weight": qkv_weight[96:128],
            new + "self_attn.q_proj.bias": qkv_bias[0:64],
            new + "self_attn.k_proj.bias": qkv_bias[64:96],
            new + "self_attn.v_proj.bias": qkv_bias[96:128],
            new + "self_attn.o_proj.weight": state[old + "self_attention.dense.weight"],
            new + "post_attention_layernorm.weight": state[old + "post_attention_layernorm.weight"],
            new + "mlp.gate_up_proj.weight": state[old + "mlp.dense_h_to_4h.weight"],
            new + "mlp.down_proj.weight": state[old + "mlp.dense_4h_to_h.weight"],
        }
    return expected


def write_original(folder, state: dict[str, torch.Tensor], vocab: int, fmt: str = "bin", shards: int = 2):
    """An original checkpoint folder: config.json, weights in ``shards`` files with an index, tokenizer.model."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(original_config(vocab), indent=2))
    ChatGLM2Tokenizer.from_pretrained().save_pretrained(folder)
    names = list(state)
    weight_map = {}
    for k in range(shards):
        part = {name: state[name] for name in names[k::shards]}
        if fmt == "bin":
            file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, folder / file)
        else:
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: t.contiguous() for n, t in part.items()}, folder / file)
        weight_map |= {name: file for name in part}
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def vocab(tokenizer) -> int:
    return padded_vocab_size(len(tokenizer))  # 6,144 for the bundled 6,005-token tokenizer


@pytest.fixture(scope="module")
def state(vocab) -> dict[str, torch.Tensor]:
    return original_state(vocab, torch.bfloat16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, state, vocab):
    """The two-shard .bin checkpoint, converted."""
    tmp = tmp_path_factory.mktemp("convert")
    return convert(write_original(tmp / "original", state, vocab), tmp / "converted")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_every_tensor_lands_where_it_should(tmp_path, state, vocab, fmt):
    dst = convert(write_original(tmp_path / "original", state, vocab, fmt), tmp_path / "converted")
    written = {}
    for file in dst.glob("*.safetensors"):
        written |= load_file(file)
    expected = expected_tensors(state)
    assert set(written) == set(expected)  # nothing else: the rotary inv_freq is dropped
    assert len(written) == 3 + 11 * LAYERS
    for name, tensor in expected.items():
        assert written[name].dtype == torch.bfloat16, name  # the source's dtype
        assert torch.equal(written[name], tensor), name
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


def test_single_file_and_dtype(tmp_path, state, vocab):
    src = write_original(tmp_path / "original", state, vocab, "bin", shards=1)
    (src / "pytorch_model.bin.index.json").unlink()
    (src / "pytorch_model-00001-of-00001.bin").rename(src / "pytorch_model.bin")
    main([str(src), str(tmp_path / "converted"), "--dtype", "float32"])
    written = load_file(tmp_path / "converted" / "model.safetensors")
    assert written["model.layers.1.self_attn.k_proj.weight"].dtype == torch.float32
    qkv = state["transformer.encoder.layers.1.self_attention.query_key_value.weight"]
    assert torch.equal(written["model.layers.1.self_attn.k_proj.weight"], qkv[64:96].float())


def test_loads_and_computes_like_an_independently_built_model(converted, state, vocab, tokenizer):
    model, info = GlmForCausalLM.from_pretrained(converted, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert ChatGLM2Tokenizer.from_pretrained(converted).fingerprint == tokenizer.fingerprint

    reference = GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=vocab)).eval()
    reference.load_state_dict({name: t.float() for name, t in expected_tensors(state).items()})
    ids = torch.tensor([tokenizer.encode("[Round 1]\n\n问：你好\n\n答：")])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_training_starts_from_the_converted_weights(converted, tmp_path, cache_dir, tokenizer):
    from hydra.utils import instantiate

    from glm_session.train import train

    overrides = [
        "model=chatglm2-tiny", f"model.init_from={converted}", "data.limit=8", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
        "+callbacks.record._target_=helpers.RecordBatches", f"+callbacks.record.path={tmp_path / 'batches.jsonl'}",
    ]  # fmt: skip
    cfg = compose_config("train", overrides)
    optimizer = instantiate(cfg.optimizer)
    module = instantiate(cfg.model, _partial_=True)(tokenizer_size=len(tokenizer), optimizer=optimizer)
    module.configure_model()  # what the Trainer calls
    weights = load_file(converted / "model.safetensors")
    assert module.model.state_dict().keys() >= weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(module.model.state_dict()[name], tensor.float()), name

    metrics, _ = train(cfg)
    assert metrics["global_steps"] == 2
    first_step = json.loads((tmp_path / "batches.jsonl").read_text().splitlines()[0])
    checksum = sum(float(p.double().sum()) for p in module.parameters())  # RecordBatches' sum, before any step
    assert first_step[0] == 0 and first_step[-1] == pytest.approx(checksum, rel=1e-12)


# errors ------------------------------------------------------------------------------------------


def convert_error(src, dst) -> str:
    with pytest.raises(ConversionError) as err:
        convert(src, dst)
    assert not dst.exists()  # nothing is written before everything is checked
    return str(err.value)


def test_missing_tensor(tmp_path, state, vocab):
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    src = write_original(tmp_path / "original", {k: v for k, v in state.items() if k != name}, vocab)
    message = convert_error(src, tmp_path / "converted")
    assert f"no tensor {name} in pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin" in message


def test_unknown_tensor(tmp_path, state, vocab):
    extra = "transformer.prefix_encoder.embedding.weight"  # a p-tuning prefix is not part of the model
    src = write_original(tmp_path / "original", {**state, extra: torch.zeros(8, 64)}, vocab, fmt="safetensors")
    message = convert_error(src, tmp_path / "converted")
    assert message.startswith(str(src / "model-00001-of-00002.safetensors"))  # the 21st of 21 names: shard 1
    assert f"unknown tensor {extra}" in message


def test_layer_beyond_the_config_and_wrong_shape(tmp_path, state, vocab):
    extra = "transformer.encoder.layers.2.input_layernorm.weight"
    src = write_original(tmp_path / "a", {**state, extra: torch.ones(64)}, vocab)
    message = convert_error(src, tmp_path / "a-converted")
    assert extra in message and "model.layers.2.input_layernorm.weight" in message

    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    src = write_original(tmp_path / "b", {**state, name: torch.zeros(64 + 2 * 16, 64)}, vocab)
    message = convert_error(src, tmp_path / "b-converted")
    assert f"{name} has 96 rows, the config needs 64 + 2 x 32 = 128" in message

    name = "transformer.output_layer.weight"
    src = write_original(tmp_path / "c", {**state, name: torch.zeros(vocab, 32)}, vocab)
    message = convert_error(src, tmp_path / "c-converted")
    assert f"{name} gives lm_head.weight of shape (6144, 32), the config needs (6144, 64)" in message


def test_missing_files(tmp_path, state, vocab, capsys):
    src = write_original(tmp_path / "original", state, vocab)
    (src / "tokenizer.model").unlink()
    expected = f"{src / 'tokenizer.model'}: missing (ChatGLM2's SentencePiece model is needed)"
    assert convert_error(src, tmp_path / "converted") == expected
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "converted")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {expected}\n"  # the message, no traceback

    ChatGLM2Tokenizer.from_pretrained().save_pretrained(src)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    index = src / "pytorch_model.bin.index.json"
    expected = f"{index}: lists pytorch_model-00002-of-00002.bin, which {src} lacks"
    assert convert_error(src, tmp_path / "converted") == expected

    shutil.rmtree(src)
    src.mkdir()
    assert convert_error(src, tmp_path / "converted").startswith(f"{src / 'config.json'}: missing")


def test_corrupt_weights_and_unsupported_config(tmp_path, state, vocab):
    src = write_original(tmp_path / "original", state, vocab)
    (src / "pytorch_model-00001-of-00002.bin").write_bytes(b"not a checkpoint")
    message = convert_error(src, tmp_path / "converted")
    assert message.startswith(f"{src / 'pytorch_model-00001-of-00002.bin'}: cannot be read as weights")

    config = {**original_config(vocab), "rope_ratio": 16}  # chatglm2-6b-32k scales the rotary angles
    (src / "config.json").write_text(json.dumps(config))
    message = convert_error(src, tmp_path / "converted")
    assert message == f"{src / 'config.json'}: rope_ratio=16 is not supported (ChatGLM2 has 1)"


@pytest.mark.parametrize(
    "fields, message",
    [
        # ZeroDivisionError tracebacks, the first even with kv_channels given
        ({"num_attention_heads": 0}, "num_attention_heads=0; it must be above 0"),
        ({"kv_channels": 0}, "kv_channels=0; it must be above 0"),
        # written without a word, a model that fails at its first forward or has no positions or no epsilon
        ({"multi_query_group_num": 3},
         "4 attention heads do not form groups of multi_query_group_num=3 (each key-value head serves a whole group)"),
        ({"seq_length": 0}, "seq_length=0; it must be above 0"),
        ({"layernorm_epsilon": -1.0}, "layernorm_epsilon=-1.0; it must be above 0"),
        ({"num_layers": -1}, "num_layers=-1; it must be above 0"),  # blamed a tensor that did not fit
        # session 18's audit: tracebacks (a strict dataclass, an assertion on the padding index), or written taken
        ({"eos_token_id": "x"}, "eos_token_id='x'; it must be a token id, 0 to padded_vocab_size - 1"),
        ({"eos_token_id": True}, "eos_token_id=True; it must be a token id, 0 to padded_vocab_size - 1"),
        ({"pad_token_id": 99999}, "pad_token_id=99999; it must be a token id, 0 to padded_vocab_size - 1"),
        ({"eos_token_id": -1}, "eos_token_id=-1; it must be a token id, 0 to padded_vocab_size - 1"),
    ],
)
def test_config_sizes_that_make_no_model_are_named(tmp_path, state, vocab, fields, message):
    src = write_original(tmp_path / "original", state, vocab)
    (src / "config.json").write_text(json.dumps({**original_config(vocab), **fields}))
    error = convert_error(src, tmp_path / "converted")
    assert error == f"{src / 'config.json'}: {message}" or message.endswith("- 1") and error == (
        f"{src / 'config.json'}: {message} ({vocab - 1})"
    ), error


def test_weights_that_are_no_model_are_named(tmp_path, state, vocab):
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    for name, value, message in [
        (qkv, torch.tensor(1.0), f"{qkv} is a scalar, not rows of q, k and v"),  # an IndexError traceback
        ("transformer.embedding.word_embeddings.weight", state["transformer.embedding.word_embeddings.weight"].long(),
         "tensor transformer.embedding.word_embeddings.weight is torch.int64, not floating point"),  # a traceback
        ("transformer.output_layer.weight", state["transformer.output_layer.weight"].clone().index_fill_(1, torch.tensor([3]), float("nan")),
         f"tensor transformer.output_layer.weight holds {vocab} non-finite values"),  # written, refused at training
    ]:  # fmt: skip
        src = write_original(tmp_path / name, {**state, name: value}, vocab)
        message_ = convert_error(src, tmp_path / f"{name}-converted")
        assert message_.startswith(str(src)) and message_.endswith(message), message_
    src = write_original(tmp_path / "index", state, vocab)
    index = src / "pytorch_model.bin.index.json"
    for content, reason in [([1, 2], "TypeError('list indices must be integers"),
                            ({"weight_map": {qkv: 7}}, "TypeError('a file name that is not a string')"),
                            ({"weight_map": {qkv: str(tmp_path / "outside.bin")}}, f"ValueError('{tmp_path}/outside.bin "
                             "is not a file of the folder"),  # read before, from wherever it pointed
                            ({"weight_map": {qkv: "../outside.bin"}}, "ValueError('../outside.bin is not a file of the")]:  # fmt: skip
        index.write_text(json.dumps(content))
        assert convert_error(src, tmp_path / "converted").startswith(f"{index}: not a weight index with a 'weight_map' "
                                                                     f"({reason}")  # fmt: skip
