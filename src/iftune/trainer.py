"""`IFTConfig` and `IFTTrainer`: TRL's SFT data pipeline with the IFT objective as its loss.

Everything SFTTrainer does with data (conversational, prompt/completion or plain text;
assistant-only and completion-only loss; packing; padding-free batches; PEFT; gradient
checkpointing; `report_to`) is inherited. Only the loss changes: the two passes of
`iftune.objective.ift_loss`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import get_config_model_id

from iftune.errors import UserError, check_choice, check_unit
from iftune.families import check_batch
from iftune.modeling import FORWARD_KEYS, sequence_count
from iftune.objective import OPTION_NAMES, IFTOptions, ift_loss

logger = logging.getLogger("iftune")

# What IFTTrainer gathers per micro-batch, in `IFTOutput`'s order (sums, then counts).
METRIC_SUMS = ("sft_loss", "intuitive_nll", "sequences", "correct", "tokens")
LOG_LEGEND = (
    "IFT logs: loss = the objective, the relation-weighted NLL on the mixed inputs (eq. 17-22; "
    "the weights favour tokens that influence later ones, so it starts above sft_loss); "
    "sft_loss = the plain teacher-forced NLL of the intuition pass (what SFT would report); "
    "intuitive_nll = the unweighted NLL on the mixed inputs; intuition_accuracy = how often the "
    "model's own choice equals the target; lambda = eq. 17's lam."
)


def default_bf16() -> bool:
    """bf16 only where the hardware has it: TRL's default (True) fails on a CPU-only machine."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


LM_HEADS = ("iftune", "trl")


def default_lm_head(use_cpu: bool) -> str:
    """TRL's fused head where training runs on a CUDA device (0.76-0.83x iftune's step time on
    an H200, docs/performance.md), iftune's chunked head elsewhere (the faster on CPU)."""
    return "trl" if torch.cuda.is_available() and not use_cpu else "iftune"


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
    lm_head: str | None = field(
        default=None,
        metadata={
            "help": "LM head of the training pass: 'iftune' (chunked, trained positions only; "
            "the faster on CPU) or 'trl' (TRL's fused LM head, a Triton kernel on GPU; the "
            "faster on an H200). None (default): 'trl' where training runs on a CUDA "
            "device, else 'iftune'. Not part of the objective.",
            "choices": list(LM_HEADS),
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
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train on assistant turns only. None (default): True for conversational `messages` "
            "data (IFT must not replace prompt tokens), False for other formats, whose prompt TRL "
            "masks with completion_only_loss; True on non-conversational data is refused."
        },
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding",
        metadata={
            "help": "The Trainer's count of trained-on tokens, logged as num_input_tokens_seen; "
            "checkpoints keep it, so it continues after a resume."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = default_bf16() and not self.fp16
        for name in ("min_lambda", "max_lambda"):
            check_unit(name, getattr(self, name))
        check_choice("lambda_schedule", self.lambda_schedule, (None, "linear"))
        check_choice("lambda_disturb", self.lambda_disturb, (None, "normal"))
        if self.lm_head is None:
            self.lm_head = default_lm_head(self.use_cpu)
        check_choice("lm_head", self.lm_head, LM_HEADS)
        if self.lambda_warmup_steps < 0:
            raise UserError(f"lambda_warmup_steps={self.lambda_warmup_steps!r} is not valid; expected an integer >= 0")
        if not self.disturb_std >= 0:
            raise UserError(f"disturb_std={self.disturb_std!r} is not valid; expected a number >= 0")
        self.ift_options()  # the objective's own options, checked where they are defined
        if self.packing and self.packing_strategy == "wrapped":
            raise UserError(
                "packing_strategy='wrapped' carries no document boundaries, so IFT's intuition would "
                "cross documents; use packing_strategy='bfd'"
            )
        # Options of SFTTrainer's loss that IFT's loss replaces: refused rather than silently ignored.
        for name, ignored in (
            ("loss_type", self.loss_type != "nll"),
            ("label_smoothing_factor", bool(self.label_smoothing_factor)),
        ):
            if ignored:
                raise UserError(
                    f"{name}={getattr(self, name)!r} is not supported by IFT, whose loss replaces "
                    f"SFTTrainer's; leave it at its default"
                )
        super().__post_init__()

    def ift_options(self, lam: float | None = None) -> IFTOptions:
        """The objective's options (`IFTOptions`) from this config's fields of the same names;
        `lam` defaults to `max_lambda` (the trainer passes each step's `lambda_at`)."""
        shared = {name: getattr(self, name) for name in OPTION_NAMES if name != "lam"}
        return IFTOptions(lam=self.max_lambda if lam is None else lam, **shared)

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
        if args is None:  # named as SFTTrainer names its default run
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = IFTConfig(f"{name.split('/')[-1]}-IFT")
        elif not isinstance(args, IFTConfig):
            raise TypeError("IFTTrainer needs an IFTConfig")
        resolve_assistant_only_loss(args, _first_row(train_dataset))
        if kwargs.get("compute_loss_func") is not None:
            raise UserError("compute_loss_func is not supported by IFTTrainer: IFT's loss replaces it")
        super().__init__(model, args, data_collator, train_dataset, *pos, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the whole window's sequence count
        self._check_parallelism()
        self.ift_options = args.ift_options()
        self._batch_checked = False  # the head (and packed rows) against the model's own forward, once
        # Sums and counts of the IFT metrics over every micro-batch and process since the last log.
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._micro_step = (-1, 0)

    def _check_parallelism(self) -> None:
        """Refuse the layouts whose sharding IFT's extra head and embedding calls cannot see."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            raise UserError(
                "FSDP1 (fsdp_version: 1) is not supported: IFT calls the LM head outside the forward, "
                "where FSDP1 shows the flat sharded parameter; use FSDP2 (fsdp_version: 2)"
            )
        config = self.accelerator.parallelism_config
        if config is not None and (config.cp_enabled or config.sp_enabled or config.tp_enabled):
            raise UserError(
                "context, sequence and tensor parallelism are not supported by IFT: its intuition pass "
                "needs whole sequences on each rank; use data parallelism, FSDP2 or ZeRO-3"
            )

    def train(self, *args, **kwargs):
        if self.is_world_process_zero():
            logger.info(LOG_LEGEND)
        return super().train(*args, **kwargs)

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
        """This micro-batch's share of the step's IFT loss (`ift_loss`, scaled by `window_mean`),
        plus the MoE router aux loss as SFTTrainer adds it; gathers the IFT metrics. With
        `return_outputs`, `(loss, None)`: IFT builds no logits."""
        mode = "train" if self.model.training else "eval"
        lam = self.args.lambda_at(self.state.global_step, disturb=mode == "train")
        # The forward runs under accelerate's autocast (it wraps model.forward); the embedding
        # lookups and head calls made outside it run under the same autocast here.
        with self.accelerator.autocast():
            if mode == "train" and not self._batch_checked:
                check_batch(model, inputs)  # every rank, its first micro-batch: the same calls
                self._batch_checked = True
            out = ift_loss(
                model,
                inputs["input_ids"],
                inputs["labels"],
                inputs.get("attention_mask"),
                replace(self.ift_options, lam=lam),
                position_ids=inputs.get("position_ids"),
                generator=self._generator(inputs["input_ids"].device),
                train_logprobs=self._trl_head(model, inputs) if self.args.lm_head == "trl" else None,
                **{k: v for k, v in inputs.items() if k in FORWARD_KEYS},  # padding-free collator's keys
            )
        loss = self.window_mean(out.loss_sum, out.n_sequences, num_items_in_batch)
        if self.aux_loss_enabled and out.aux_loss is not None:
            # As SFTTrainer: a per-micro-batch mean that DDP averages across processes; with
            # `num_items_in_batch` the Trainer leaves accumulation to the loss, so / the steps.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * out.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(out.aux_loss.detach()).mean().item()
            )
        self._add_metrics(mode, out)
        self._metrics[mode]["lambda"].append(lam)
        return (loss, None) if return_outputs else loss

    def window_mean(self, loss_sum: torch.Tensor, n_sequences: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """This micro-batch's share of the step's loss: its per-sequence losses summed, over the
        sequence count of the whole accumulation window and of every process (times the process
        count, since DDP averages gradients); without that count, the micro-batch's own mean."""
        if num_items_in_batch is None:
            return loss_sum / n_sequences.clamp_min(1)
        loss = loss_sum / torch.as_tensor(num_items_in_batch).clamp_min(1)
        return loss * self.accelerator.num_processes if self.args.average_tokens_across_devices else loss

    @staticmethod
    def _trl_head(model, inputs):
        """The training pass through the fused LM head that SFTTrainer attaches to the model."""

        def logprobs(inputs_embeds: torch.Tensor, labels: torch.Tensor):
            out = model(
                inputs_embeds=inputs_embeds,
                attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
                labels=labels,
                fused_lm_head=True,
            )
            return out.log_probs, getattr(out, "aux_loss", None)

        return logprobs

    def _add_metrics(self, mode: str, out: Any) -> None:
        """Add this micro-batch's sums and counts, gathered over processes (one collective, made
        by every process on every micro-batch), to those of the logging window."""
        sums = torch.stack(
            [out.sft_loss_sum, out.intuitive_nll_sum, out.n_sequences, out.n_correct, out.n_tokens]
        ).detach()
        totals = self.accelerator.reduce(sums.double(), reduction="sum").tolist()
        for key, value in zip(METRIC_SUMS, totals):
            self._metric_sums[mode][key] += value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The window's IFT metrics, sums divided by counts: token- and sequence-weighted over
        every micro-batch and process, as one big batch would give them."""
        mode = "train" if self.model.training else "eval"
        sums = self._metric_sums[mode]
        if sums["sequences"]:
            prefix = "eval_" if mode == "eval" else ""
            logs[f"{prefix}sft_loss"] = sums["sft_loss"] / sums["sequences"]
            logs[f"{prefix}intuitive_nll"] = sums["intuitive_nll"] / sums["sequences"]
            logs[f"{prefix}intuition_accuracy"] = sums["correct"] / max(1.0, sums["tokens"])
        sums.clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`(loss, None, None)`: IFT builds no full logits, so evaluation reports the loss only."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def resolve_assistant_only_loss(args: SFTConfig, sample: dict | None) -> None:
    """Fill in iftune's default `assistant_only_loss=None` from the data: True for conversational
    data, False otherwise (TRL supports it for conversational data only). An explicit True on
    other data is refused, never rewritten."""
    if sample is None:
        return
    conversational = is_conversational(sample)
    if args.assistant_only_loss is None:
        args.assistant_only_loss = conversational
    elif args.assistant_only_loss and not conversational:
        raise UserError(
            f"--assistant_only_loss true needs conversational data (a `messages` column), but the data has "
            f"columns {sorted(sample)}; leave it unset or set --assistant_only_loss false"
        )


def _first_row(dataset) -> dict | None:
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()))
    try:
        return next(iter(dataset))
    except (StopIteration, TypeError):
        return None


__all__ = ["LM_HEADS", "IFTConfig", "IFTTrainer", "default_bf16", "default_lm_head", "resolve_assistant_only_loss"]
