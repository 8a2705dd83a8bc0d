"""`IFTConfig` and `IFTTrainer`: TRL's SFT data pipeline with the IFT objective as its loss.

Everything SFTTrainer does with data (conversational, prompt/completion or plain text;
assistant-only and completion-only loss; packing; padding-free batches; PEFT; gradient
checkpointing; `report_to`) is inherited. Only the loss changes: the two passes of
`iftune.objective.ift_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl import SFTConfig, SFTTrainer

from iftune.errors import UserError, check_choice, check_unit
from iftune.modeling import FORWARD_KEYS, sequence_count
from iftune.objective import check_intuition_options, check_relation_options, ift_loss


def default_bf16() -> bool:
    """bf16 only where the hardware has it: TRL's default (True) fails on a CPU-only machine."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class IFTConfig(SFTConfig):
    r"""Configuration for [`IFTTrainer`]: every [`trl.SFTConfig`] option plus the IFT objective's.

    Equation numbers refer to Hua et al., "Intuitive Fine-Tuning" (2024); defaults are the
    authors' published recipe (lam 0.2, gamma 0.95, loss propagation, left side, L1).
    """

    min_lambda: float = field(default=0.2, metadata={"help": "Eq. 17: lam at the start of the `linear` schedule."})
    max_lambda: float = field(
        default=0.2,
        metadata={
            "help": "Eq. 17: weight lam of the model's own intuition in the temporal residual "
            "connection x = (1-lam) E[s_i] + lam E[pi(s_{i-1})]; used as is without a schedule."
        },
    )
    lambda_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Eq. 17: None (constant max_lambda) or 'linear' (min -> max over "
            "lambda_warmup_steps optimizer steps)."
        },
    )
    lambda_warmup_steps: int = field(default=0, metadata={"help": "Eq. 17: steps of the linear lam schedule."})
    lambda_disturb: str | None = field(
        default=None,
        metadata={
            "help": "Eq. 17: None or 'normal': lam <- lam + eps*disturb_std*lam, eps~N(0,1) "
            "seeded per step, clamped to [0, 1]."
        },
    )
    disturb_std: float = field(default=0.1, metadata={"help": "Eq. 17: relative std of the lam disturbance."})
    gamma: float = field(
        default=0.95,
        metadata={
            "help": "Eq. 22 (with the Bellman decay of eq. 23): discount of dynamic relation "
            "propagation; 0 disables it."
        },
    )
    propagation: str = field(
        default="loss",
        metadata={
            "help": "Eq. 22: what is propagated: 'loss' (-logp/n), 'logps' (-logp) or "
            "'mask' (token counting, eq. 22 read literally)."
        },
    )
    side: str = field(
        default="left",
        metadata={
            "help": "Eq. 22: 'left' (a token weighs what it influences later) "
            "or 'right' (the reference code's inverse variant)."
        },
    )
    norm: str = field(default="L1", metadata={"help": "Eq. 22: weight transform: 'L1', 'L2', 'softmax' or 'log'."})
    intuition: str = field(
        default="greedy",
        metadata={"help": "Eq. 17: how pi(s_{i-1}) is chosen: 'greedy', 'rank' (k-th most likely) or 'sample'."},
    )
    intuition_k: int = field(default=1, metadata={"help": "Eq. 17: k for intuition='rank' (1 = greedy)."})
    intuition_temperature: float = field(default=1.0, metadata={"help": "Eq. 17: temperature for 'sample'."})
    intuition_embeddings: str = field(
        default="live",
        metadata={
            "help": "Eq. 17: table E: 'live' (the model's, trained through the lookup) or "
            "'detached' (the current table, no gradient through either lookup, as the "
            "reference code's refreshed copy)."
        },
    )
    detach_weights: bool = field(
        default=False, metadata={"help": "Eq. 22: stop the gradient through the relation weights."}
    )
    lm_head: str = field(
        default="iftune",
        metadata={
            "help": "LM head of the training pass: 'iftune' (chunked, trained positions "
            "only; measured fastest on CPU) or 'trl' (TRL's fused LM head, a Triton "
            "kernel on GPU). Not part of the objective."
        },
    )
    head_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Trained positions whose logits exist at once in iftune's LM-head path "
            "(None: ~128 MiB of float32 logits; larger is faster on CPU, uses more "
            "memory). Not part of the objective."
        },
    )
    head_logits_budget_mb: float | None = field(
        default=None,
        metadata={
            "help": "MiB of logits iftune's LM-head path keeps for the backward instead of "
            "recomputing them (None: 512; 0: recompute every chunk; the gradients are the "
            "same). Not part of the objective."
        },
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Train on assistant turns only (conversational `messages` data). IFT "
            "must not replace prompt tokens; set to False for other formats automatically."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            self.bf16 = default_bf16()
        for name in ("min_lambda", "max_lambda"):
            check_unit(name, getattr(self, name))
        check_relation_options(self.gamma, self.propagation, self.side, self.norm)
        check_intuition_options(self.intuition, self.intuition_k, self.intuition_temperature, self.intuition_embeddings)
        check_choice("lambda_schedule", self.lambda_schedule, (None, "linear"))
        check_choice("lambda_disturb", self.lambda_disturb, (None, "normal"))
        check_choice("lm_head", self.lm_head, ("iftune", "trl"))
        if self.lambda_warmup_steps < 0:
            raise UserError(f"lambda_warmup_steps={self.lambda_warmup_steps!r} is not valid; expected an integer >= 0")
        if not self.disturb_std >= 0:
            raise UserError(f"disturb_std={self.disturb_std!r} is not valid; expected a number >= 0")
        if self.head_chunk_size is not None and self.head_chunk_size < 1:
            raise UserError(f"head_chunk_size={self.head_chunk_size!r} is not valid; expected None or an integer >= 1")
        if self.packing and self.packing_strategy == "wrapped":
            raise UserError(
                "packing_strategy='wrapped' carries no document boundaries, so IFT's intuition would "
                "cross documents; use packing_strategy='bfd'"
            )
        # Options of SFTTrainer's loss that IFT's loss replaces: refused rather than silently ignored.
        for name, ignored in (
            ("loss_type", self.loss_type != "nll"),
            ("label_smoothing_factor", bool(self.label_smoothing_factor)),
            ("router_aux_loss_coef", bool(self.router_aux_loss_coef)),
        ):
            if ignored:
                raise UserError(
                    f"{name}={getattr(self, name)!r} is not supported by IFT, whose loss replaces "
                    f"SFTTrainer's; leave it at its default"
                )
        if self.include_num_input_tokens_seen in ("no", False):
            # The Trainer's count, logged as num_input_tokens_seen and restored on resume.
            self.include_num_input_tokens_seen = "non_padding"
        super().__post_init__()

    def lambda_at(self, step: int, disturb: bool = True) -> float:
        """lam for optimizer step `step` (eq. 17): the schedule, then the seeded disturbance."""
        lam = self.max_lambda
        if self.lambda_schedule == "linear":
            frac = 1.0 if self.lambda_warmup_steps == 0 else min(1.0, step / self.lambda_warmup_steps)
            lam = self.min_lambda + (self.max_lambda - self.min_lambda) * frac
        if self.lambda_disturb == "normal" and disturb:
            # Seeded by step alone, so a resumed run draws the same noise as an uninterrupted one.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            eps = torch.randn((), generator=gen, dtype=torch.float64).item()
            lam = min(1.0, max(0.0, lam + eps * self.disturb_std * lam))
        return float(lam)


class IFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is Intuitive Fine-Tuning (eq. 17-22).

    The loss of an optimizer step is the mean, over every sequence of the accumulation window
    and of every process, of each sequence's weighted mean token loss: the same update as one
    big batch, whatever the split into micro-batches and processes.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "iftune", "ift"]
    _name = "IFT"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single Process",
        "id": "2405.11870",
        "citation": "@article{hua2024intuitive,\n  title={Intuitive Fine-Tuning: Towards Simplifying Alignment "
        "into a Single Process},\n  author={Hua, Ermo and Qi, Biqing and Zhang, Kaiyan and Yu, Yue and "
        "Ding, Ning and Lv, Xingtai and Tian, Kai and Zhou, Bowen},\n  journal={arXiv preprint "
        "arXiv:2405.11870},\n  year={2024}\n}",
    }

    def __init__(self, model, args: IFTConfig | None = None, data_collator=None, train_dataset=None, *pos, **kwargs):
        if args is None:
            name = (
                model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
            )
            args = IFTConfig(f"{str(name).split('/')[-1]}-IFT")
        elif not isinstance(args, IFTConfig):
            raise TypeError("IFTTrainer needs an IFTConfig")
        sample = _first_row(train_dataset)
        if args.assistant_only_loss and sample is not None and "messages" not in sample:
            args.assistant_only_loss = False  # TRL supports it for `messages` data only
        if kwargs.get("compute_loss_func") is not None:
            raise UserError("compute_loss_func is not supported by IFTTrainer: IFT's loss replaces it")
        super().__init__(model, args, data_collator, train_dataset, *pos, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the whole window's sequence count
        self._check_parallelism()
        self._micro_step = (-1, 0)

    def _check_parallelism(self) -> None:
        """Refuse the layouts whose sharding IFT's extra head and embedding calls cannot see."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            raise UserError(
                "FSDP1 (fsdp_version: 1) is not supported: IFT calls the LM head outside the forward, "
                "where FSDP1 shows the flat sharded parameter; use FSDP2 (fsdp_version: 2)"
            )
        if getattr(self, "aux_loss_enabled", False):
            raise UserError(
                "the MoE router auxiliary loss is not supported by IFT, whose loss replaces SFTTrainer's; "
                "set router_aux_loss_coef=0"
            )
        config = self.accelerator.parallelism_config
        if config is not None and (config.cp_enabled or config.sp_enabled or config.tp_enabled):
            raise UserError(
                "context, sequence and tensor parallelism are not supported by IFT: its intuition pass "
                "needs whole sequences on each rank; use data parallelism, FSDP2 or ZeRO-3"
            )

    # -- gradient accumulation: count sequences, not tokens, over the whole window
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(sequence_count(b["labels"], b.get("position_ids")) for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.args.intuition != "sample":
            return None
        # One seed per (step, micro-batch, process): sampling resumes exactly from a checkpoint.
        step = self.state.global_step
        micro = self._micro_step[1] + 1 if self._micro_step[0] == step else 0
        self._micro_step = (step, micro)
        seed = hash((self.args.seed, step, micro, self.accelerator.process_index)) % (2**63)
        return torch.Generator(device=device).manual_seed(seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This micro-batch's share of the step's IFT loss (`ift_loss`, scaled by `window_mean`);
        logs the IFT metrics. With `return_outputs`, `(loss, None)`: IFT builds no logits."""
        mode = "train" if self.model.training else "eval"
        lam = self.args.lambda_at(self.state.global_step, disturb=mode == "train")
        args = self.args
        extra = {k: v for k, v in inputs.items() if k in FORWARD_KEYS}  # padding-free collator's keys
        # The forward runs under accelerate's autocast (it wraps model.forward); the embedding
        # lookups and head calls made outside it run under the same autocast here.
        with self.accelerator.autocast():
            out = ift_loss(
                model,
                inputs["input_ids"],
                inputs["labels"],
                inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
                lam=lam,
                gamma=args.gamma,
                propagation=args.propagation,
                side=args.side,
                norm=args.norm,
                intuition=args.intuition,
                intuition_k=args.intuition_k,
                intuition_temperature=args.intuition_temperature,
                intuition_embeddings=args.intuition_embeddings,
                detach_weights=args.detach_weights,
                generator=self._generator(inputs["input_ids"].device),
                head_chunk_size=args.head_chunk_size,
                train_logprobs=self._trl_head(model, inputs) if args.lm_head == "trl" else None,
                with_sft_loss=mode == "eval" or self._logs_this_step(),
                **extra,
            )
        loss = self.window_mean(out.loss_sum, out.n_sequences, num_items_in_batch)
        self._log_metrics(mode, out, lam)
        return (loss, None) if return_outputs else loss

    def window_mean(self, loss_sum: torch.Tensor, n_sequences: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """This micro-batch's share of the step's loss: its per-sequence losses summed, over the
        sequence count of the whole accumulation window and of every process (times the process
        count, since DDP averages gradients); without that count, the micro-batch's own mean."""
        if num_items_in_batch is None:
            return loss_sum / n_sequences.clamp_min(1)
        loss = loss_sum / torch.as_tensor(num_items_in_batch).clamp_min(1)
        return loss * self.accelerator.num_processes if self.args.average_tokens_across_devices else loss

    def _logs_this_step(self) -> bool:
        """Whether the current optimizer step ends in a log line: `sft_loss` (a log-sum-exp
        over the vocabulary) is only computed for the steps whose metrics are logged."""
        args, step = self.args, self.state.global_step + 1
        if args.logging_strategy != "steps":
            return args.logging_strategy != "no"  # per epoch: not known ahead, so always
        # A ratio (< 1) is turned into steps by the Trainer when training starts.
        every = max(1, int(args.logging_steps if args.logging_steps >= 1 else self.state.logging_steps))
        return step % every == 0 or (args.logging_first_step and step == 1)

    @staticmethod
    def _trl_head(model, inputs):
        """The training pass through the fused LM head that SFTTrainer attaches to the model."""

        def logprobs(inputs_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(
                inputs_embeds=inputs_embeds,
                attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
                labels=labels,
                fused_lm_head=True,
            ).log_probs

        return logprobs

    def _log_metrics(self, mode: str, out: Any, lam: float) -> None:
        gather = self.accelerator.gather_for_metrics
        stats = torch.stack([out.sft_loss, out.intuitive_nll, out.intuition_accuracy.to(out.sft_loss.dtype)])
        stats = gather(stats.detach().float().reshape(1, -1)).reshape(-1, 3).mean(0).tolist()
        for key, value in zip(("sft_loss", "intuitive_nll", "intuition_accuracy"), stats):
            if value == value:  # NaN: sft_loss is not computed on steps that are not logged
                self._metrics[mode][key].append(value)
        self._metrics[mode]["lambda"].append(lam)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`(loss, None, None)`: IFT builds no full logits, so evaluation reports the loss only."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _first_row(dataset) -> dict | None:
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()))
    try:
        return next(iter(dataset))
    except (StopIteration, TypeError):
        return None


__all__ = ["IFTConfig", "IFTTrainer", "default_bf16"]
