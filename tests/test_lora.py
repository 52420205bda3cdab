"""LoRA through peft (peft=lora, glm_session/adapters.py) on CPU in fp32, chatglm2-tiny:

- Invariant 2 on the adapters: one optimizer step of two accumulation micro-batches gives the same adapter gradient
  for split+token and session+token, and for split+sample and session+turn;
- the base is frozen: no gradient, and not a bit changed by AdamW (weight decay included);
- a run's checkpoint holds the adapters only; resuming it on another base is refused;
- export: the merged folder loads in plain transformers with the adapted model's logits; the adapter folder loads
  with ``peft.PeftModel.from_pretrained`` to the same logits, and ``model.init_adapter`` starts a run from it;
- bad settings are one-line config errors; so are a resume with other adapter settings, an adapter folder that is
  damaged or was trained at another scale or on another base, and a damaged run record;
- QLoRA (peft=qlora: the base's decoder-layer linear weights in NF4 through bitsandbytes, which runs on a CPU too):
  the weights are NF4 to within half its widest gap, Invariant 2 holds on the adapters over the 4-bit base, a run
  saves, resumes, measures and exports as a LoRA run, and what it cannot do is refused in one line.
"""

import dataclasses
import functools
import json
import re

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import GlmForCausalLM

from glm_session.adapters import check_peft
from glm_session.checkpoints import CheckpointError, load_model, read_checkpoint
from glm_session.config import RESOURCES_DIR, compose_config
from glm_session.data import DialogueDataModule
from glm_session.errors import ConfigError
from glm_session.export import main as export_main
from glm_session.model import ChatGLM2Module, chatglm2_config, padded_vocab_size
from glm_session.train import train

VALIDATION = str(RESOURCES_DIR / "kdconv/validation.jsonl")
LORA = {"method": "lora", "rank": 4, "alpha": 8}
IDS = torch.tensor([[1, 5, 7, 300, 42, 9, 11, 2]])


def lora_module(tokenizer, reduction="token", peft=LORA, **kwargs) -> ChatGLM2Module:
    """chatglm2-tiny (seed 0) with rank-4 adapters whose B is drawn too (seed 1): every adapter has a gradient."""
    module = ChatGLM2Module.from_preset("chatglm2-tiny", len(tokenizer), reduction=reduction, peft=peft, **kwargs)
    torch.manual_seed(0)
    module.configure_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return module


def one_step(
    tokenizer, cache_dir, strategy, reduction, optimizer=None, peft=LORA
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the adapters' change, the base's change) in one step over every sample of 4 sessions, 2 micro-batches."""
    datamodule = DialogueDataModule(tokenizer, "chatglm2", strategy, train_path=VALIDATION, limit=4, batch_size=1,
                                    max_seq_len=2048, cache_dir=cache_dir)  # fmt: skip
    rows = len(datamodule.pipeline.prepared("train").rows.samples)
    datamodule.pipeline.batching = dataclasses.replace(datamodule.pipeline.batching, batch_size=-(-rows // 2))
    module = lora_module(
        tokenizer, reduction, peft, optimizer=optimizer or functools.partial(torch.optim.SGD, lr=1.0)
    )
    adapters = [p for n, p in module.named_parameters() if "lora_" in n]
    base = [p for n, p in module.named_parameters() if "lora_" not in n]
    before = [torch.cat([p.detach().flatten().clone() for p in group]) for group in (adapters, base)]
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=1, accumulate_grad_batches=2,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and all(p.grad is None for p in base)
    after = [torch.cat([p.detach().flatten() for p in group]) for group in (adapters, base)]
    return before[0] - after[0], before[1] - after[1]


RUNS = [("split", "token"), ("session", "token"), ("split", "sample"), ("session", "turn")]


@pytest.fixture(scope="module")
def steps(tokenizer, cache_dir):
    return {run: one_step(tokenizer, cache_dir, *run) for run in RUNS}


def check_invariant_2(steps):
    for split, session in ((("split", "token"), ("session", "token")), (("split", "sample"), ("session", "turn"))):
        a, b = steps[split][0], steps[session][0]
        assert a.abs().max() > 1e-4  # a real gradient on every adapter kind (A and B)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the reductions differ: the check can fail
    assert (steps["split", "token"][0] - steps["split", "sample"][0]).abs().max() > 1e-4


def test_invariant_2_holds_on_the_adapter_gradients(steps):
    check_invariant_2(steps)


def test_the_base_gets_no_gradient_and_does_not_change(steps, tokenizer, cache_dir):
    for _, base_change in steps.values():
        assert torch.count_nonzero(base_change) == 0
    adamw = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    adapters, base = one_step(tokenizer, cache_dir, "session", "token", optimizer=adamw)
    assert torch.count_nonzero(base) == 0 and adapters.abs().max() > 1e-4


def test_adapters_are_fp32_on_a_bf16_base(tokenizer):
    module = ChatGLM2Module.from_preset("chatglm2-tiny", len(tokenizer), optimizer=torch.optim.SGD,
                                        peft={**LORA, "base_dtype": "bf16"})  # fmt: skip
    module.configure_model()
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dtypes if "lora_" in n} and len(trainable) == 2 * 2 * 6  # 2 layers, A and B


class Created(Exception):
    """Raised in place of ``post_init`` once the model is created, with its parameters' (dtype, device) pairs."""


def created(tokenizer, monkeypatch, peft, default_device="cpu") -> set[tuple[torch.dtype, str]]:
    """The (dtype, device type) pairs of the parameters ``configure_model`` creates under ``default_device`` (as
    Lightning calls it under the trainer's device), the hook stopped right after the creation."""

    def stop(model):
        raise Created({(p.dtype, p.device.type) for p in model.parameters()})

    monkeypatch.setattr(GlmForCausalLM, "post_init", stop)
    module = ChatGLM2Module.from_preset("chatglm2-tiny", len(tokenizer), optimizer=torch.optim.SGD, peft=peft)
    with torch.device(default_device), pytest.raises(Created) as raised:
        module.configure_model()
    return raised.value.args[0]


def test_a_bf16_base_is_never_whole_in_fp32(tokenizer, monkeypatch):
    """Created in fp32 and then cast, the 6B's base would hold 23.4 GiB at its creation (the peak of issue 22's
    first 24 GB-card measurement); each weight is created in bf16 instead. Full fine-tuning keeps fp32 weights."""
    assert created(tokenizer, monkeypatch, {**LORA, "base_dtype": "bf16"}) == {(torch.bfloat16, "cpu")}
    assert created(tokenizer, monkeypatch, None) == {(torch.float32, "cpu")}


@pytest.mark.parametrize(
    "peft, message",
    [
        ({"method": "lora", "rank": 0}, "model.peft.rank=0"),
        ({"method": "lora", "rank": 4, "target_modules": ["qkv"]}, "model.peft.target_modules"),
        ({"method": "lora", "ranks": 4}, "model.peft.ranks"),
        ({"method": "prefix"}, "model.peft.method='prefix'"),
        ({"method": "lora", "alpha": float("nan")}, "model.peft.alpha=nan: must be a number > 0"),  # nan loss
        ({"method": "lora", "alpha": float("inf")}, "model.peft.alpha=inf: must be a number > 0"),
        ({"method": "none", "quantize": "nf4"}, "model.peft.quantize='nf4': must be left out with peft=none"),
        ({"method": "lora", "double_quant": False}, "model.peft.double_quant=false: must be left at true"),
    ],
)
def test_bad_settings_are_config_errors(peft, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_peft(peft)


def test_an_adapter_on_lm_head_trains_through_the_chunked_loss_as_through_the_logits(tokenizer, cache_dir):
    """The chunked loss calls the output layer itself, so its adapter is not skipped: the same losses and the same
    gradients (lm_head's adapters included) as the reference loss through the (B, T, V) logits."""
    settings = check_peft({"method": "lora", "target_modules": ["q_proj", "lm_head"]})
    assert settings.target_modules == ("q_proj", "lm_head")
    datamodule = DialogueDataModule(tokenizer, "chatglm2", "session", train_path=VALIDATION, limit=4, batch_size=2,
                                    max_seq_len=2048, shuffle=False, cache_dir=cache_dir)  # fmt: skip
    batch = next(iter(datamodule.dataloader("train")))
    peft = {**LORA, "target_modules": ["q_proj", "lm_head"]}
    losses, grads = {}, {}
    for chunk in (None, 5):
        module = lora_module(tokenizer, peft=peft, optimizer=torch.optim.SGD, loss_chunk_tokens=chunk)
        losses[chunk] = module.token_losses(batch)
        losses[chunk].sum().backward()
        grads[chunk] = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    head = {n for n in grads[None] if n.startswith("model.lm_head.")}
    assert len(head) == 2 and all(grads[5][n].abs().max() > 0 for n in head)  # lm_head's lora_A and lora_B
    torch.testing.assert_close(losses[5], losses[None], rtol=1e-5, atol=1e-5)
    assert grads[5].keys() == grads[None].keys()
    for name in grads[None]:
        torch.testing.assert_close(grads[5][name], grads[None][name], rtol=1e-4, atol=1e-6)


# -- a LoRA run: checkpoint, resume, export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, tokenizer):
    """A chatglm2-tiny base as a Hugging Face folder (what glm_session.convert writes)."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(3)
    GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))).save_pretrained(
        folder
    )
    return folder


def lora_run(folder, base, cache_dir, *extra, peft="lora"):
    rank = [] if peft == "none" else ["model.peft.rank=4"]
    overrides = ["model=chatglm2-tiny", f"peft={peft}", *rank, f"model.init_from={base}", "data.limit=8",
                 "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", "optimizer.lr=1e-2", f"output_dir={folder}",
                 f"data.cache_dir={cache_dir}", *extra]  # fmt: skip
    return train(compose_config("train", overrides))


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, base_folder, cache_dir):
    run = tmp_path_factory.mktemp("lora_run")
    lora_run(run, base_folder, cache_dir)
    return run / "checkpoints" / "last.ckpt"


def test_a_checkpoint_holds_the_adapters_and_the_base_fingerprint(lora_checkpoint, base_folder):
    checkpoint = read_checkpoint(lora_checkpoint)
    keys = list(checkpoint["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys) and len(keys) == 2 * 2 * 6
    info = checkpoint["glm_session"]
    assert info["peft"]["method"] == "lora" and info["peft"]["rank"] == 4 and "quantize" not in info["peft"]
    assert info["init_from"] == str(base_folder) and len(info["base_fingerprint"]) == 64


def test_resuming_on_another_base_is_refused(lora_checkpoint, tmp_path, tokenizer, cache_dir):
    other = tmp_path / "other_base"
    torch.manual_seed(4)
    GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))).save_pretrained(
        other
    )
    with pytest.raises(CheckpointError, match="its adapters were trained on the base"):
        lora_run(tmp_path / "resumed", other, cache_dir, f"ckpt_path={lora_checkpoint}")


def test_a_moved_base_is_named_as_the_checkpoints_and_the_adapters_still_export(lora_checkpoint, tmp_path):
    content = torch.load(lora_checkpoint, weights_only=True)
    content["glm_session"]["init_from"] = str(tmp_path / "moved_base")  # as if the base folder had been moved
    torch.save(content, tmp_path / "moved.ckpt")
    # before: "model.init_from=...: no such folder or checkpoint file (for a Hub model, write hf://<id>)", a key that
    # evaluate, chat, export and analysis do not have
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'moved.ckpt'}: the base of these LoRA adapters, "
                                                        f"{tmp_path / 'moved_base'} (the run's model.init_from), is "
                                                        "not there: put it back")):  # fmt: skip
        load_model(tmp_path / "moved.ckpt")
    export_main([str(tmp_path / "moved.ckpt"), str(tmp_path / "adapter"), "--adapter"])  # the way the error names
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def adapted_logits(checkpoint) -> torch.Tensor:
    model, _ = load_model(checkpoint)  # the base with the adapters merged in
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_adapters_moved_the_model(lora_checkpoint, base_folder):
    base = GlmForCausalLM.from_pretrained(base_folder)
    with torch.no_grad():
        before = base(input_ids=IDS).logits
    assert (adapted_logits(lora_checkpoint) - before).abs().max() > 1e-4


def test_the_merged_export_gives_the_adapted_logits(lora_checkpoint, tmp_path):
    export_main([str(lora_checkpoint), str(tmp_path / "merged")])
    merged = GlmForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted_logits(lora_checkpoint))


def test_the_adapter_export_loads_in_peft_and_starts_a_run(lora_checkpoint, base_folder, tmp_path, cache_dir):
    export_main([str(lora_checkpoint), str(tmp_path / "adapter"), "--adapter"])
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "glm_session.json"} <= files
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(base_folder)
    peft_model = PeftModel.from_pretrained(GlmForCausalLM.from_pretrained(base_folder), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, adapted_logits(lora_checkpoint))
    # model.init_adapter: a run that starts from these adapters starts from the adapted model
    _, objects = lora_run(tmp_path / "continued", base_folder, cache_dir, f"model.init_adapter={tmp_path / 'adapter'}",
                          "trainer.limit_train_batches=0", "trainer.limit_val_batches=0")  # fmt: skip
    module = objects["module"]
    with torch.no_grad():
        torch.testing.assert_close(module.model(input_ids=IDS).logits, adapted_logits(lora_checkpoint))


def test_the_adapter_export_has_the_merged_exports_tokenizer_and_takes_a_dtype(lora_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    export_main([str(lora_checkpoint), str(tmp_path / "merged")])
    export_main([str(lora_checkpoint), str(tmp_path / "adapter"), "--adapter", "--dtype", "bfloat16"])
    merged, adapter = (AutoTokenizer.from_pretrained(tmp_path / name) for name in ("merged", "adapter"))
    # before: AutoTokenizer read the bare tokenizer.model: '你好' -> [416], 6,000 pieces against the merged 6,005
    assert adapter("你好").input_ids == merged("你好").input_ids and len(adapter) == len(merged)
    messages = [{"role": "user", "content": "你好"}]
    assert adapter.apply_chat_template(messages) == merged.apply_chat_template(messages)
    # --dtype was taken and not applied: the adapters stayed float32
    assert {t.dtype for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_export_adapter_of_a_full_run_is_refused(tmp_path, cache_dir):
    run = tmp_path / "full"
    train(compose_config("train", ["model=chatglm2-tiny", "data.limit=4", "trainer.limit_train_batches=1",
                                   "trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                                   f"output_dir={run}", f"data.cache_dir={cache_dir}"]))  # fmt: skip
    with pytest.raises(SystemExit):
        export_main([str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "adapter"), "--adapter"])


@pytest.mark.parametrize(
    "peft, overrides, message",
    [
        # The optimizer state of other parameters: a traceback inside fit, or (rank) even with resume_allow_changes.
        ("none", [], r"trains other parameters than this run \(peft: \{'method': 'lora'.* -> none \(full"),
        ("lora", ["model.peft.rank=8", "resume_allow_changes=true"], r"trains other parameters.*peft.rank: 4 -> 8"),
        # A plain LoRA record has no quantize key: this resumed on a 4-bit base without a word.
        ("qlora", [], r"differs from the checkpoint's \(peft.double_quant: None -> True; peft.quantize: None -> 'nf4'"),
    ],
)
def test_resuming_with_other_adapter_settings_is_refused(peft, overrides, message, lora_checkpoint, base_folder,
                                                         tmp_path, cache_dir):  # fmt: skip
    with pytest.raises(CheckpointError, match=message):
        lora_run(tmp_path, base_folder, cache_dir, f"ckpt_path={lora_checkpoint}", *overrides, peft=peft)


def test_a_full_checkpoint_does_not_resume_a_lora_run(tmp_path, base_folder, cache_dir):
    full = tmp_path / "full"
    train(compose_config("train", ["model=chatglm2-tiny", "data.limit=4", "trainer.limit_train_batches=1",
                                   "trainer.max_epochs=1", "trainer.limit_val_batches=0",
                                   "trainer.enable_progress_bar=false", f"model.init_from={base_folder}",
                                   f"output_dir={full}", f"data.cache_dir={cache_dir}"]))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"trains other parameters than this run \(peft: none \(full fine-tun"):
        lora_run(tmp_path / "lora", base_folder, cache_dir, f"ckpt_path={full / 'checkpoints' / 'last.ckpt'}")


@pytest.fixture(scope="module")
def adapter_folder(lora_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports") / "adapter"
    export_main([str(lora_checkpoint), str(folder), "--adapter"])
    return folder


def damaged_copy(folder, tmp_path, damage):
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def truncate(copy):
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def nan_adapters(copy):
    from safetensors.torch import load_file, save_file

    state = load_file(copy / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, copy / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        (truncate, [], r"a readable adapter folder \(adapter_model.safetensors: SafetensorError"),  # a traceback
        (nan_adapters, [], r"finite adapters \(24 tensors hold nan or inf"),  # "the training loss is nan"
        (None, ["model.peft.alpha=64"], r"model.peft.alpha=64.0: must be 32.0, the lora_alpha of model.init_adapter"),
        (None, ["another base"], r"adapters of the base model.init_from names: they were trained on"),
    ],
)
def test_init_adapter_refuses_what_would_not_start_from_the_trained_model(
    damage, extra, message, adapter_folder, base_folder, tmp_path, cache_dir, tokenizer
):
    folder = damaged_copy(adapter_folder, tmp_path, damage) if damage else adapter_folder
    base = base_folder
    if extra == ["another base"]:  # same shapes, other weights: the adapters would run on what they never saw
        base, extra = tmp_path / "other_base", []
        torch.manual_seed(5)
        config = chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))
        GlmForCausalLM(config).save_pretrained(base)
    with pytest.raises(ConfigError, match=message):
        lora_run(tmp_path / "run", base, cache_dir, f"model.init_adapter={folder}", "trainer.limit_train_batches=0",
                 "trainer.limit_val_batches=0", *extra)  # fmt: skip


def test_init_adapter_without_its_base_names_the_base(adapter_folder, base_folder, tmp_path, cache_dir):
    """Without model.init_from the adapters were loaded onto random weights, a general warning aside."""
    overrides = ["model=chatglm2-tiny", "peft=lora", "model.peft.rank=4", f"model.init_adapter={adapter_folder}",
                 "data.limit=8", "trainer.limit_train_batches=0", "trainer.limit_val_batches=0",
                 "trainer.enable_progress_bar=false", f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"]  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(f"model.init_from=null: must be the base the adapters of "
                                                    f"model.init_adapter={adapter_folder} were trained on: "
                                                    f"{base_folder} (fingerprint ")):  # fmt: skip
        train(compose_config("train", overrides))


@pytest.mark.parametrize(
    "record, message",
    [
        ("lora", "its run record's peft entry ('lora') is not LoRA settings"),
        ({**LORA, "rank": "4"}, "cannot be read (model.peft.rank='4': must be an integer >= 1)"),
        ({**LORA, "target_modules": None}, "cannot be read (model.peft.target_modules=null: must be a non-empty"),
        ({**LORA, "use_dora": True}, "cannot be read (model.peft.use_dora=true: must be one of the LoRA keys"),
        ({**LORA, "quantize": "int4"}, "cannot be read (quantize='int4'"),
    ],
)
def test_a_damaged_peft_record_is_named_not_a_traceback(record, message, lora_checkpoint, tmp_path, capsys):
    """A checkpoint whose record was edited or written by another version: export said TypeError or AttributeError."""
    from glm_session.adapters import settings_of

    with pytest.raises(ValueError) as raised:
        settings_of(record)
    assert message in str(raised.value)
    checkpoint = read_checkpoint(lora_checkpoint)
    checkpoint["glm_session"]["peft"] = record
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(SystemExit) as exit_:
        export_main([str(tmp_path / "edited.ckpt"), str(tmp_path / "adapter"), "--adapter"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_lora_without_a_base_warns_and_its_adapters_are_not_exported_baseless(tmp_path, cache_dir, caplog):
    overrides = ["model=chatglm2-tiny", "peft=lora", "model.peft.rank=4", "data.limit=4", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                 f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}"]  # fmt: skip
    train(compose_config("train", overrides))
    assert "model.peft=lora without model.init_from: the adapters train on randomly initialised weights" in caplog.text
    with pytest.raises(SystemExit):  # before: an adapter folder whose base_model_name_or_path is null
        export_main([str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "adapter"), "--adapter"])
    assert not (tmp_path / "adapter").exists()


def test_a_relative_base_is_recorded_as_an_absolute_path(tmp_path, base_folder, cache_dir, monkeypatch):
    """The record is read from other folders (evaluate, export, chat): a relative path would name nothing there."""
    import os

    monkeypatch.chdir(tmp_path)
    lora_run(tmp_path / "run", os.path.relpath(base_folder, tmp_path), cache_dir, "trainer.limit_train_batches=1",
             "trainer.limit_val_batches=0")  # fmt: skip
    info = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["glm_session"]
    assert info["init_from"] == str(base_folder.resolve()) and info["init_from"].startswith("/")


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_a_killed_lora_run_resumes_to_the_same_adapters(tmp_path, base_folder, cache_dir, peft):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    common = ["model=chatglm2-tiny", f"peft={peft}", "model.peft.rank=4", f"model.init_from={base_folder}",
              "data.limit=24", "data.max_seq_len=1024", "data.batch_tokens=1024", "trainer.max_epochs=1",
              "trainer.limit_train_batches=1.0", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
              "optimizer.lr=1e-2", "callbacks.last_checkpoint.every_n_train_steps=3", f"data.cache_dir={cache_dir}"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(compose_config("train", [*common, f"output_dir={whole}"]))
    command = [sys.executable, "-m", "glm_session.train", *common, f"hydra.run.dir={killed}",
               "+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=7"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    train(compose_config("train", [*common, f"output_dir={killed}", f"ckpt_path={last}"]))
    ends = [read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (whole, killed)]
    assert ends[0]["global_step"] == ends[1]["global_step"] > 7
    for key, value in ends[0]["state_dict"].items():
        torch.testing.assert_close(ends[1]["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    optimizer = [end["optimizer_states"][0]["state"] for end in ends]  # the adapters' AdamW moments only
    assert len(optimizer[0]) == len(ends[0]["state_dict"]) == 2 * 2 * 6


def test_analysis_measures_the_per_turn_weights_on_the_adapter_gradients(lora_checkpoint, tmp_path, cache_dir,
                                                                         capsys):  # fmt: skip
    from glm_session.analysis.__main__ import main as analysis_main

    model, _ = load_model(lora_checkpoint, merge_adapters=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    code = analysis_main(["measure", "measure.sessions=2", f"measure.ckpt_path={lora_checkpoint}",
                          f"data.cache_dir={cache_dir}", f"out_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "measured.json").read_text())
    assert len(results) == 6
    for name, result in results.items():
        assert result["turns"] >= 10 and result["max_abs_error"] < 1e-4, name
    # Another tokenizer than the run's: ids past the model's vocabulary, an IndexError, before this check.
    with pytest.raises(SystemExit):
        analysis_main(["measure", "measure.sessions=2", f"measure.ckpt_path={lora_checkpoint}", "tokenizer=zhbase",
                       f"data.cache_dir={cache_dir}", f"out_dir={tmp_path / 'zh'}"])  # fmt: skip
    assert f"error: {lora_checkpoint}: trained with tokenizer " in capsys.readouterr().err
    assert not (tmp_path / "zh" / "measured.json").exists()
    # Another template than the run's: measured in a format it never saw, exit 0, before session 18
    with pytest.raises(SystemExit):
        analysis_main(["measure", "measure.sessions=2", f"measure.ckpt_path={lora_checkpoint}",
                       "template=chatglm2_article", f"data.cache_dir={cache_dir}", f"out_dir={tmp_path / 'tpl'}"])  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {lora_checkpoint}: trained with template=chatglm2, "
                                                        "not with template=chatglm2_article: give template=chatglm2")  # fmt: skip


# -- QLoRA: the same adapters over a 4-bit base ---------------------------------------------------------------------

QLORA = {**LORA, "quantize": "nf4"}
# NF4's 16 levels are fixed (bitsandbytes' table); the widest gap is between its two lowest, -1 and -0.6962
NF4_HALF_WIDEST_GAP = (1.0 - 0.6961928009986877) / 2


def test_qlora_holds_the_decoder_linears_in_nf4(tokenizer):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from glm_session.training.run_metrics import weights

    modules = {}
    for name, peft in (("full", LORA), ("nf4", {**QLORA, "double_quant": False})):
        torch.manual_seed(0)
        modules[name] = ChatGLM2Module.from_preset(
            "chatglm2-tiny", len(tokenizer), optimizer=torch.optim.SGD, peft=peft
        )
        modules[name].configure_model()
    full, nf4 = (dict(modules[name].model.named_parameters()) for name in ("full", "nf4"))
    quantized = [n for n, p in nf4.items() if p.dtype == torch.uint8]
    assert len(quantized) == 2 * 6  # every linear weight of the 2 decoder layers; nothing else
    assert all(isinstance(nf4[n], bnb.nn.Params4bit) and ".base_layer." in n for n in quantized)
    assert {n for n, p in nf4.items() if p.requires_grad} == {n for n, p in full.items() if p.requires_grad}
    assert all(torch.equal(full[n], p) for n, p in nf4.items() if n not in quantized)  # embeddings, norms, lm_head
    assert sum(weights(p) for p in nf4.values()) == sum(p.numel() for p in full.values())  # the MFU's count
    for name in quantized:
        original, blocks = full[name].detach(), dequantize_4bit(nf4[name].data, nf4[name].quant_state)
        original, blocks = original.flatten().view(-1, 64), blocks.flatten().view(-1, 64)
        scale = original.abs().amax(dim=1, keepdim=True)  # each block of 64 values is scaled by its largest
        error = (blocks - original).abs()
        assert bool((error <= NF4_HALF_WIDEST_GAP * scale + 1e-6).all()) and error.mean() > 1e-4, name
        assert max(len(torch.unique(block)) for block in blocks) <= 16  # 4 bits: 16 levels a block


def test_a_qlora_base_is_created_on_the_cpu_whatever_the_default_device(tokenizer, monkeypatch):
    """Lightning calls ``configure_model`` with the trainer's device as the default one: a QLoRA base created there in
    bf16 (11.7 GiB for the 6B) would not fit the card QLoRA is for. It is created on the CPU, and each decoder linear
    quantized onto the device. (The meta device stands in for the GPU here; LoRA without 4 bits keeps the default.)"""
    assert created(tokenizer, monkeypatch, QLORA, default_device="meta") == {(torch.float32, "cpu")}
    assert created(tokenizer, monkeypatch, LORA, default_device="meta") == {(torch.float32, "meta")}


@pytest.fixture(scope="module")
def qlora_steps(tokenizer, cache_dir):
    return {run: one_step(tokenizer, cache_dir, *run, peft=QLORA) for run in RUNS}


def test_invariant_2_holds_on_the_adapter_gradients_over_a_4bit_base(qlora_steps, steps):
    check_invariant_2(qlora_steps)
    for _, base_change in qlora_steps.values():
        assert torch.count_nonzero(base_change) == 0
    # the 4-bit base is not the full one: the same adapters get another gradient
    assert (qlora_steps["session", "token"][0] - steps["session", "token"][0]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def qlora_checkpoint(tmp_path_factory, base_folder, cache_dir):
    run = tmp_path_factory.mktemp("qlora_run")
    _, objects = lora_run(run, base_folder, cache_dir, peft="qlora")
    with torch.no_grad():
        trained = objects["module"].model(input_ids=IDS).logits
    return run / "checkpoints" / "last.ckpt", trained


def test_a_qlora_run_keeps_its_adapters_and_measures_them_on_its_4bit_base(qlora_checkpoint, tmp_path, cache_dir):
    from glm_session.analysis.__main__ import main as analysis_main

    path, trained = qlora_checkpoint
    checkpoint = read_checkpoint(path)
    assert all(".lora_A." in k or ".lora_B." in k for k in checkpoint["state_dict"])
    assert len(checkpoint["state_dict"]) == 2 * 2 * 6
    assert checkpoint["glm_session"]["peft"]["quantize"] == "nf4"
    model, _ = load_model(path, merge_adapters=False)  # the base quantized again: the model the run trained
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, trained, rtol=0, atol=0)
    code = analysis_main(["measure", "measure.sessions=2", f"measure.ckpt_path={path}",
                          f"data.cache_dir={cache_dir}", f"out_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    for name, result in json.loads((tmp_path / "measured.json").read_text()).items():
        assert result["turns"] >= 10 and result["max_abs_error"] < 1e-4, name


def test_a_qlora_export_merges_the_adapters_into_the_full_precision_base(qlora_checkpoint, base_folder, tmp_path):
    from glm_session.adapters import merged, settings_of
    from glm_session.checkpoints import model_state

    path, trained = qlora_checkpoint
    export_main([str(path), str(tmp_path / "merged")])
    exported = GlmForCausalLM.from_pretrained(tmp_path / "merged")
    checkpoint = read_checkpoint(path)
    by_hand = merged(GlmForCausalLM.from_pretrained(base_folder), settings_of(checkpoint["glm_session"]["peft"]),
                     model_state(checkpoint, path))  # fmt: skip
    with torch.no_grad():
        logits = exported(input_ids=IDS).logits
        torch.testing.assert_close(logits, by_hand(input_ids=IDS).logits)
    # the trained model differs from it by the 4-bit rounding of the base alone
    assert 1e-3 < (logits - trained).abs().max() < 0.3 * trained.abs().max()


def test_a_qlora_adapter_export_starts_a_qlora_run_where_it_ended(
    qlora_checkpoint, base_folder, tmp_path, cache_dir
):
    path, trained = qlora_checkpoint
    export_main([str(path), str(tmp_path / "adapter"), "--adapter"])
    _, objects = lora_run(tmp_path / "continued", base_folder, cache_dir, f"model.init_adapter={tmp_path / 'adapter'}",
                          "trainer.limit_train_batches=0", "trainer.limit_val_batches=0", peft="qlora")  # fmt: skip
    with torch.no_grad():  # the same base quantized the same way, the same adapters: the same model
        torch.testing.assert_close(objects["module"].model(input_ids=IDS).logits, trained, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer=fsdp", "trainer.accelerator=cpu"], "model.peft.quantize='nf4': must be null with trainer=fsdp"),
        (["model.compile_layers=true"], "model.compile_layers=true: must be false with model.peft.quantize"),
        (["model.peft.quantize=int4"], "model.peft.quantize='int4'"),
        (["model.peft.double_quant=1"], "model.peft.double_quant=1"),
    ],
)
def test_what_qlora_cannot_do_is_refused(overrides, message, tmp_path, base_folder, cache_dir):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        lora_run(tmp_path, base_folder, cache_dir, *overrides, peft="qlora")


def test_qlora_without_bitsandbytes_says_how_to_install_it(monkeypatch, qlora_checkpoint):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes: ImportError
    install = r"model.peft.quantize='nf4'.*pip install 'glm_session\[qlora\]'"
    with pytest.raises(ConfigError, match=install):
        check_peft(QLORA)
    path, _ = qlora_checkpoint
    with pytest.raises(CheckpointError, match=f"{path}: {install}"):  # analysis measure's model
        load_model(path, merge_adapters=False)
    load_model(path)  # evaluate's and export's: the adapters merged into the full-precision base, no bitsandbytes
