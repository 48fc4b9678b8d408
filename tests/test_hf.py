"""transformers integration: every task loads as a ready model equal to its materialized state.

One tiny model per family (hidden 64, 2 layers, made here, never downloaded): an encoder
(BERT), two decoders (GPT-2 with a tied lm_head, Llama with rotary buffers), an
encoder-decoder (T5, tied embeddings) and a vision transformer (ViT). Each has two finetunes
made by a few real Adam steps on a synthetic task (not by adding noise), committed with DBMS
over a base vector built from both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from deltastore import Registry

transformers = pytest.importorskip("transformers")

VOCAB = 128
SEQ = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Family:
    """A tiny reference and how to make and run its finetunes."""

    reference: Callable[[], torch.nn.Module]
    finetune: Callable[[], torch.nn.Module]     # the finetune's class, fresh (weights copied in after)
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]   # training inputs with labels
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]  # evaluation inputs


def _tokens(gen: torch.Generator, n: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, SEQ), generator=gen)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)

    def batch(gen):
        x = _tokens(gen)
        return {"input_ids": x, "labels": (x[:, 0] % 2)}

    return Family(lambda: BertModel(config), lambda: BertForSequenceClassification(config), batch,
                  lambda gen: {"input_ids": _tokens(gen), "attention_mask": torch.ones(8, SEQ, dtype=torch.long)})


def _causal(config_cls, model_cls, **kwargs):
    config = config_cls(vocab_size=VOCAB, **kwargs)

    def batch(gen):
        x = _tokens(gen)
        x[:, 1::2] = (x[:, 0::2] * 7) % VOCAB  # something learnable
        return {"input_ids": x, "labels": x}

    return Family(lambda: model_cls(config), lambda: model_cls(config), batch,
                  lambda gen: {"input_ids": _tokens(gen)})


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return _causal(GPT2Config, GPT2LMHeadModel, n_embd=64, n_layer=2, n_head=2, n_positions=32)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _causal(LlamaConfig, LlamaForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

    def batch(gen):
        x = _tokens(gen)
        return {"input_ids": x, "labels": x.flip(1)}

    def inputs(gen):
        return {"input_ids": _tokens(gen), "decoder_input_ids": _tokens(gen)[:, :5]}

    return Family(lambda: T5ForConditionalGeneration(config), lambda: T5ForConditionalGeneration(config), batch,
                  inputs)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128, num_labels=3)

    def pixels(gen):
        return torch.randn(8, 3, 16, 16, generator=gen)

    def batch(gen):
        x = pixels(gen)
        return {"pixel_values": x, "labels": (x.mean(dim=(1, 2, 3)) > 0).long()}

    # The classifier has no pooler: a reference with one would hold tensors the finetunes lack.
    return Family(lambda: ViTModel(config, add_pooling_layer=False), lambda: ViTForImageClassification(config),
                  batch, lambda gen: {"pixel_values": pixels(gen)})


FAMILIES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5, "vit": _vit}


def make_family(name: str, root: Path, *, n_finetunes: int = 2, steps: int = 3, seed: int = 0,
                shard: bool = False, dtype: torch.dtype | None = None) -> tuple[Path, list[Path], Family]:
    """Save a reference and ``n_finetunes`` finetunes made by ``steps`` Adam steps each."""
    family = FAMILIES[name]()
    torch.manual_seed(seed)
    reference = family.reference()
    save: dict[str, Any] = {"max_shard_size": "100KB"} if shard else {}
    reference.save_pretrained(root / "reference", **save)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n_finetunes):
        torch.manual_seed(seed + 1 + i)
        model = family.finetune()
        own = model.state_dict()
        prefix = "" if set(reference.state_dict()) <= set(own) else model.base_model_prefix + "."
        model.load_state_dict({prefix + k: v for k, v in reference.state_dict().items()}, strict=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(steps):
            loss = model(**family.batch(gen)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        if dtype is not None:
            model = model.to(dtype)
        path = root / f"finetune{i}"
        model.save_pretrained(path, **save)
        paths.append(path)
    return root / "reference", paths, family


def _from_state(registry: Registry, task: str, tmp_path: Path) -> torch.nn.Module:
    """The independent path: materialize()'s state dict and the stored config.json written as
    a plain Hugging Face directory, loaded by transformers' own from_pretrained."""
    from safetensors.torch import save_file

    _, record = registry.version(task)
    config_json = registry.objects.get_blob(record.files["config.json"])
    out = tmp_path / f"{task}-from-state"
    out.mkdir()
    (out / "config.json").write_bytes(config_json)
    save_file({n: t.contiguous() for n, t in registry.materialize(task).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cls = getattr(transformers, json.loads(config_json)["architectures"][0])
    return cls.from_pretrained(out).eval()


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_registry(request, tmp_path_factory):
    """(registry with tasks t0 (bitdelta) and t1 (dare) over base 'all', family, finetune paths)."""
    root = tmp_path_factory.mktemp(request.param)
    reference, finetunes, family = make_family(request.param, root)
    registry = Registry.init(root / "registry", reference, progress=False)
    registry.build_base("all", finetunes, progress=False)
    registry.commit("t0", finetunes[0], method="bitdelta", base="all", progress=False)
    registry.commit("t1", finetunes[1], method="dare", config={"drop_rate": 0.9}, base="all", progress=False)
    return registry, family, finetunes


@pytest.mark.parametrize("task", ["t0", "t1"])
def test_load_model_equals_materialized_state(family_registry, task, tmp_path):
    registry, family, finetunes = family_registry
    inputs = family.inputs(torch.Generator().manual_seed(7))
    loaded = registry.load_model(task)
    expected_class = json.loads((finetunes[0] / "config.json").read_text())["architectures"][0]
    assert type(loaded).__name__ == expected_class
    assert not loaded.training
    built = _from_state(registry, task, tmp_path)
    got, want = _outputs(loaded, inputs), _outputs(built, inputs)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), float((got - want).abs().max())
    # Buffers that are no parameters (position ids, rotary frequencies) are computed, not garbage.
    assert {n: b for n, b in loaded.named_buffers()}.keys() == {n: b for n, b in built.named_buffers()}.keys()
    for (name, a), (_, b) in zip(sorted(loaded.named_buffers()), sorted(built.named_buffers())):
        assert torch.equal(a, b), name
    # And the compressed task is still close to the finetune it came from.
    finetune = type(loaded).from_pretrained(finetunes[int(task[1])]).eval()
    ref_out = _outputs(finetune, inputs)
    assert float((got - ref_out).pow(2).mean()) < float(ref_out.pow(2).mean())


@pytest.mark.cuda
def test_build_model_keeps_device_tensors_in_place(family_registry):
    """On the GPU the model holds the materialized tensors themselves: no copy to the host and back
    (transformers builds on the CPU unless told the device), which made load_model 6.9x slower
    than materialize at Llama-2-7B size."""
    from deltastore.hf import build_model

    registry, _, _ = family_registry
    _, record = registry.version("t0")
    state = registry.materialize("t0", device="cuda")
    model = build_model(registry.objects.get_blob(record.files["config.json"]), state, what="t0")
    pointers = {t.data_ptr() for t in state.values()}
    loaded = model.state_dict()
    assert all(t.device.type == "cuda" for t in loaded.values())
    assert pointers <= {t.data_ptr() for t in loaded.values()}


def test_tied_weights_are_stored_once_and_retied(family_registry):
    registry, family, finetunes = family_registry
    model = registry.load_model("t0")
    _, record = registry.version("t0")
    for alias, canonical in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        assert alias not in record.tensors  # the checkpoint omits the copy, so does the store
        assert model.get_parameter(alias) is model.get_parameter(canonical)


def test_no_random_initialisation(family_registry, monkeypatch):
    """load_model never draws random weights for a real (non-meta) tensor."""
    from transformers import initialization

    touched: list[tuple[str, tuple[int, ...]]] = []
    random_inits = ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                    "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")

    def counting(name, original):
        def init(tensor, *args, **kwargs):
            if tensor.device.type != "meta":
                touched.append((name, tuple(tensor.shape)))
            return original(tensor, *args, **kwargs)
        return init

    for name in random_inits:
        monkeypatch.setitem(initialization.TORCH_INIT_FUNCTIONS, name,
                            counting(name, initialization.TORCH_INIT_FUNCTIONS[name]))
        monkeypatch.setattr(torch.nn.init, name, counting(name, getattr(torch.nn.init, name)))
    registry, _, _ = family_registry
    registry.load_model("t0")
    assert touched == []
    torch.nn.Linear(4, 4)  # the counter works: a plain module does draw random weights
    assert touched


def test_sharded_bf16_and_fp16_checkpoints(tmp_path):
    """Sharded safetensors with an index file (reference and finetunes), in fp16 and bf16."""
    for dtype in (torch.bfloat16, torch.float16):
        root = tmp_path / str(dtype).removeprefix("torch.")
        reference, finetunes, family = make_family("gpt2", root, shard=True, dtype=dtype)
        assert (finetunes[0] / "model.safetensors.index.json").is_file()
        assert len(list(finetunes[0].glob("*.safetensors"))) > 1
        registry = Registry.init(root / "registry", reference, progress=False)
        registry.build_base("all", finetunes, progress=False)
        registry.commit("t0", finetunes[0], method="bitdelta", base="all", progress=False)
        state = registry.materialize("t0")
        assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype}
        loaded = registry.load_model("t0")
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        inputs = family.inputs(torch.Generator().manual_seed(3))
        got, want = _outputs(loaded, inputs), _outputs(_from_state(registry, "t0", root), inputs)
        assert torch.equal(got, want)
        # dtype= casts on load
        as32 = registry.load_model("t0", dtype=torch.float32)
        assert {p.dtype for p in as32.parameters()} == {torch.float32}


def test_load_model_refuses_a_task_without_config(tmp_path):
    from deltastore import InvalidInputError

    reference, finetunes, _ = make_family("bert", tmp_path, n_finetunes=1, steps=1)
    registry = Registry.init(tmp_path / "registry", reference, progress=False)
    from safetensors.torch import load_file

    state = load_file(str(finetunes[0] / "model.safetensors"))
    registry.commit("bare", state, method="bitdelta", progress=False)
    with pytest.raises(InvalidInputError, match="no config.json"):
        registry.load_model("bare")


def test_dbms_tuner_runs_every_family(family_registry):
    """The fit builds and runs each architecture: renamed keys (ViT), tied weights (GPT-2, T5),
    rotary buffers (Llama), encoder-decoder outputs (T5), pixel inputs (ViT)."""
    registry, family, finetunes = family_registry
    calibration = [family.inputs(torch.Generator().manual_seed(11))]
    record = registry.commit("t0-fit", finetunes[0], method="bitdelta", base="all", tune="dbms",
                             calibration=calibration, tune_options={"max_steps": 3}, progress=False)
    fit = record.tuning
    assert fit["tensors_fitted"] > 0 and fit["output"] == "logits"
    assert fit["loss_final"] <= fit["loss_initial"]
    # Its starting loss is the error of the stored closed-form version, measured independently.
    finetune = type(registry.load_model("t0")).from_pretrained(finetunes[0]).eval()
    want = _outputs(finetune, calibration[0])
    got = _outputs(registry.load_model("t0", 1), calibration[0])
    assert fit["loss_initial"] == pytest.approx(float((got - want).pow(2).mean()), rel=1e-3)
