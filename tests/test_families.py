"""The family matrix: IFT on tiny random models of each family a TRL user brings, built from
the family's transformers config (nothing downloaded; docs/models.md lists what is checked).

For every family: (a) `ift_loss` at lam 0, gamma 0 is the model's own loss, and iftune's head
gives the log-probs of the model's own logits; (b) lam 0.2, gamma 0.95 gives finite gradients on
every parameter, in float32 and under bf16 autocast; (c) packed rows (padding-free) give the
padded batch's loss; (d) LoRA with PEFT's default targets trains. A family whose packed rows
attend across documents, and a head transform iftune does not know, are refused in one line.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from conftest import build_tokenizer, first_batch, make_trainer, run_offline
from iftune import cli
from iftune.errors import UserError
from iftune.families import check_batch, check_head_matches, check_lora_targets, check_packed_documents, uncompiled
from iftune.lm_head import logit_transform
from iftune.objective import ift_loss

VOCAB = 64
FIRST_WORD = 7  # ids below are the special tokens of `iftune.tiny.SPECIALS`
# Tiny shapes every family takes (names per transformers' common config attributes); larger
# than default init so that logits are far from 0 and a wrong head scale shows in the loss.
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    initializer_range=0.3,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Per family: what differs from BASE. Non-default head transforms are set so that they matter.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "mistral": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 2.0},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 2.0},
    "phi3": {},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
    "hyperclovax": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.5},
    "olmo2": {},
    "gpt_neox": {"num_key_value_heads": None},
    "gpt2": {"num_key_value_heads": None, "intermediate_size": None},
    # Mixture of experts, without its router loss here: the loss compared is the language model's.
    "qwen3_moe": {
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
    },
    "mixtral": {
        "head_dim": 8,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
    },
}
# PEFT 0.21 has no default LoRA targets for these (its error: "Please specify `target_modules`"),
# or ends with none on transformers 5's MoE models (mixtral: its default q_proj/v_proj are lost
# in PEFT's weight-conversion step): they take --lora_target_modules.
NO_PEFT_DEFAULTS = {"phi3", "granite", "hyperclovax", "cohere", "olmo2", "qwen3_moe", "mixtral"}
# Vision-language checkpoints, trained on text through their language model.
VLMS = ("qwen2_vl", "llava", "gemma3")
# Families that build their attention mask from `position_ids` neither with sdpa nor eager.
CROSS_DOCUMENT = {"bloom": {"n_head": 2, "n_layer": 2}, "mpt": {"d_model": 16, "n_heads": 2, "n_layers": 2}}


def tiny(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A causal LM of `model_type` from `FAMILIES` (or `CROSS_DOCUMENT`), float32, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = FAMILIES.get(model_type, CROSS_DOCUMENT.get(model_type, {}))
    fields = {k: v for k, v in {**BASE, **extra, **overrides}.items() if v is not None}
    if model_type in CROSS_DOCUMENT:
        fields = {k: v for k, v in fields.items() if k not in ("intermediate_size", "num_key_value_heads")}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).to(torch.float32)


def tiny_vlm(model_type: str, vocab_size: int = VOCAB, seed: int = 0) -> torch.nn.Module:
    """A vision-language model of `model_type` (one of `VLMS`) with a tiny vision tower; its
    image and video markers are 4 ids after `vocab_size`, which text never has."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = {k: v for k, v in BASE.items() if k != "tie_word_embeddings"} | {"vocab_size": vocab_size + 4}
    names = ("image_token_id", "video_token_id", "boi_token_id", "eoi_token_id")
    marks = dict(zip(names, range(vocab_size, vocab_size + 4)))
    text["num_hidden_layers"] = 1
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    if model_type == "qwen2_vl":
        rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
        config = AutoConfig.for_model(
            "qwen2_vl",
            text_config={**text, "rope_parameters": rope},
            vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2),
            image_token_id=marks["image_token_id"],
            video_token_id=marks["video_token_id"],
            vision_start_token_id=marks["boi_token_id"],
            vision_end_token_id=marks["eoi_token_id"],
        )
    elif model_type == "llava":
        config = AutoConfig.for_model(
            "llava",
            text_config={"model_type": "llama", **text},
            vision_config={"model_type": "clip_vision_model", **vision, "patch_size": 14, "projection_dim": 16},
            image_token_id=marks["image_token_id"],
        )
    else:
        config = AutoConfig.for_model(
            "gemma3",
            text_config={"model_type": "gemma3_text", **text, "head_dim": 8, "final_logit_softcapping": 2.0},
            vision_config={"model_type": "siglip_vision_model", **vision, "patch_size": 14},
            mm_tokens_per_image=4,
            image_token_id=marks["image_token_id"],
            boi_token_id=marks["boi_token_id"],
            eoi_token_id=marks["eoi_token_id"],
        )
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).to(torch.float32)


def ift(model, input_ids, labels, attention_mask=None, **options):
    """Every call of the objective in this file (one place to follow its signature)."""
    return ift_loss(model, input_ids, labels, attention_mask, **options)


def batch(seed: int = 1, rows: int = 2, length: int = 12, prompt: int = 3):
    """Equal-length rows with the same number of trained tokens: the model's token-mean loss is
    then the mean of per-row means, IFT's reduction."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def packed_and_padded(seed: int = 2):
    """Two documents (9 and 6 tokens, 2 prompt tokens each) as one packed row and as a padded batch."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(FIRST_WORD, VOCAB, (n,), generator=g) for n in (9, 6)]
    labels = [d.clone() for d in docs]
    for lab in labels:
        lab[:2] = -100
    packed = (torch.cat(docs)[None], torch.cat(labels)[None], torch.cat([torch.arange(len(d)) for d in docs])[None])
    ids = torch.zeros(2, 9, dtype=torch.long)
    lab = torch.full((2, 9), -100)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, (d, lb) in enumerate(zip(docs, labels)):
        ids[i, : len(d)], lab[i, : len(d)], mask[i, : len(d)] = d, lb, 1
    return packed, (ids, lab, mask)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs() / b.abs())


# --------------------------------------------------------------------------- (a) SFT limit and head


def assert_sft_limit(model, model_type: str) -> None:
    """lam 0, gamma 0: IFT's loss is the model's own loss, and the head check passes."""
    ids, labels = batch()
    with torch.no_grad():
        own = model(input_ids=ids, labels=labels).loss
        out = ift(model, ids, labels, lam=0.0, gamma=0.0)
    assert relative(out.loss, own) < 1e-5, (model_type, float(out.loss), float(own))
    check_batch(model, {"input_ids": ids, "labels": labels})


@pytest.mark.parametrize("model_type", FAMILIES)
def test_sft_limit_is_the_models_own_loss(model_type):
    assert_sft_limit(tiny(model_type).eval(), model_type)


@pytest.mark.parametrize("model_type", VLMS)
def test_vision_language_model_trains_on_text_as_its_language_model(model_type):
    assert_sft_limit(tiny_vlm(model_type).eval(), model_type)


def test_head_transforms_follow_each_forward():
    """HyperCLOVA X multiplies by logits_scaling where Granite divides (their modeling files)."""
    from transformers import AutoConfig

    assert logit_transform(AutoConfig.for_model("hyperclovax", logits_scaling=4.0)) == (4.0, None)
    assert logit_transform(AutoConfig.for_model("granite", logits_scaling=4.0)) == (0.25, None)
    assert logit_transform(AutoConfig.for_model("cohere", logit_scale=0.5)) == (0.5, None)
    assert logit_transform(AutoConfig.for_model("gemma2", final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform(AutoConfig.for_model("llama")) == (1.0, None)
    # Gemma3ForCausalLM caps at its config's value; Gemma3ForConditionalGeneration caps nothing.
    assert logit_transform(AutoConfig.for_model("gemma3_text", final_logit_softcapping=2.0)) == (1.0, 2.0)
    vlm = AutoConfig.for_model("gemma3", text_config={"model_type": "gemma3_text", "final_logit_softcapping": 2.0})
    assert logit_transform(vlm) == (1.0, None)


@pytest.mark.parametrize(
    ("model_type", "wrong"),
    [("hyperclovax", (0.25, None)), ("granite", (4.0, None)), ("gemma2", (1.0, None)), ("llama", (2.0, None))],
)
def test_a_head_transform_that_differs_from_the_models_is_refused(monkeypatch, model_type, wrong):
    model = tiny(model_type)
    ids, labels = batch()
    monkeypatch.setattr("iftune.modeling.logit_transform", lambda config: wrong)
    with pytest.raises(UserError) as err:
        check_head_matches(model, ids, labels)
    message = str(err.value)
    assert "\n" not in message and f"'{model_type}'" in message and "LOGIT_SCALES" in message, message
    assert model.training, "the check leaves the model's mode as it was"


def test_checks_run_the_model_under_torch_compile_uncompiled():
    model = tiny("llama")
    assert uncompiled(torch.compile(model)) is model  # the checks' one-row calls compile nothing
    check_batch(torch.compile(model), dict(zip(("input_ids", "labels"), batch())))


def test_head_check_is_dtype_aware_under_bf16():
    model = tiny("hyperclovax")
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_head_matches(model, ids, labels)
    model.to(torch.bfloat16)
    check_head_matches(model, ids, labels)


# --------------------------------------------------------------------------- (b) gradients


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_ift_gradients_are_finite_on_every_parameter(model_type, bf16):
    model = tiny(model_type).train()
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = ift(model, ids, labels, lam=0.2, gamma=0.95)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing and not bad, (missing, bad)


# --------------------------------------------------------------------------- (c) padding-free rows


@pytest.mark.parametrize("model_type", FAMILIES)
def test_trl_head_gives_iftune_heads_loss_and_gradient(tmp_path, model_type):
    """TRL's fused head, the default where training runs on CUDA, trains each family on the
    distribution iftune's head does: logit scales and soft caps included."""
    results = []
    for head in ("iftune", "trl"):
        trainer = make_trainer(tmp_path / head, model=tiny(model_type), per_device_train_batch_size=4, lm_head=head)
        loss = trainer.compute_loss(trainer.model, first_batch(trainer))
        loss.backward()
        results.append((loss.item(), trainer.model.get_output_embeddings().weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_rows_give_the_padded_batch_loss(model_type):
    model = tiny(model_type).eval()
    (ids, labels, position_ids), (pids, plabels, mask) = packed_and_padded()
    with torch.no_grad():
        packed = ift(model, ids, labels, None, position_ids=position_ids, lam=0.2, gamma=0.95)
        padded = ift(model, pids, plabels, mask, lam=0.2, gamma=0.95)
    assert relative(packed.loss, padded.loss) < 1e-5, (model_type, float(packed.loss), float(padded.loss))
    check_batch(model, {"input_ids": ids, "labels": labels, "position_ids": position_ids})


@pytest.mark.parametrize("model_type", CROSS_DOCUMENT)
def test_packed_rows_are_refused_where_the_model_attends_across_documents(model_type):
    model = tiny(model_type)
    (ids, labels, position_ids), _ = packed_and_padded()
    with pytest.raises(UserError) as err:
        check_batch(model, {"input_ids": ids, "labels": labels, "position_ids": position_ids})
    message = str(err.value)
    assert "\n" not in message and f"'{model_type}'" in message and "--padding_free false" in message, message
    check_packed_documents(model, ids[:, :9], position_ids[:, :9])  # one document: nothing to refuse


# --------------------------------------------------------------------------- (d) LoRA


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_with_peft_default_targets_trains(model_type):
    from peft import LoraConfig, get_peft_model

    model = tiny(model_type)
    model.config.architectures = [type(model).__name__]  # as a saved checkpoint has it
    if model_type in NO_PEFT_DEFAULTS:
        with pytest.raises(UserError, match=f"'{model_type}'.*--lora_target_modules") as err:
            check_lora_targets(model.config, LoraConfig(task_type="CAUSAL_LM"))
        assert "\n" not in str(err.value)
        config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=4)
    check_lora_targets(model.config, config)
    assert config.target_modules is None or config.target_modules == "all-linear"  # left as given
    model = get_peft_model(model, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # lora_B starts at 0: the second step moves lora_A too
        out = ift(model, *batch(), lam=0.2, gamma=0.95)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == set(before), sorted(set(before) - moved)


# --------------------------------------------------------------------------- the command


def command_args(model_dir, data, out, steps: int = 2, **extra) -> list[str]:
    args = dict(model_name_or_path=model_dir, dataset_name=data, output_dir=out, max_steps=steps,
                per_device_train_batch_size=2, use_cpu="true", report_to="none", save_strategy="no",
                disable_tqdm="true", logging_steps=1, **extra)  # fmt: skip
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def trained_losses(out) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_ift_command_trains_a_vision_language_checkpoint_on_text(tmp_path, chat_file):
    from transformers import AutoModelForImageTextToText

    tokenizer, model_dir = build_tokenizer(), tmp_path / "qwen2-vl"
    tiny_vlm("qwen2_vl", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert cli.main(["ift", *command_args(model_dir, chat_file, tmp_path / "out")]) == 0
    losses = trained_losses(tmp_path / "out")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    before = AutoModelForImageTextToText.from_pretrained(model_dir)
    changed = [n for n, p in saved.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert any("language_model" in n for n in changed) and not any("visual" in n for n in changed)


@pytest.mark.slow
def test_torch_compile_trains(tiny_model_dir, chat_file, tmp_path):
    """`--torch_compile true` on the CPU: 4 steps of `iftune ift`. Rows padded to a multiple of 16
    keep the shapes of the two passes' graphs fixed: half the compile time of letting them follow
    each batch's length (a recompile for dynamic shapes), with the same losses."""
    out = tmp_path / "compiled"
    args = command_args(
        tiny_model_dir, chat_file, out, steps=4, torch_compile="true", bf16="false", pad_to_multiple_of=16
    )
    start = time.perf_counter()
    run_offline([sys.executable, "-m", "iftune.cli", "ift", *args])
    losses = trained_losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    print(f"torch_compile run: {time.perf_counter() - start:.0f} s")
