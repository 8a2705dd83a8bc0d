"""The demo's base model: a tiny Llama and a word-level tokenizer, built and pre-trained locally.

Nothing is downloaded. The tokenizer is trained with `tokenizers` on the generated corpus, the
model is a Llama config of about half a million parameters, briefly pre-trained on that corpus, and
both are saved in the standard Hugging Face layout, so `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load the directory like any hub checkpoint. The result is
cached under `$IFTUNE_CACHE` (else `$XDG_CACHE_HOME/iftune`, else `~/.cache/iftune`) in a folder
named by a hash of everything that determines it, so later runs skip the work.

The default build (`BaseSpec()`) also ships with iftune (`SHIPPED_BASE`, about 2 MB): float
rounding differs between machines (CPU kernels, thread counts), so two machines that build it
get different weights, and fine-tuning results that depend on them. Starting from the shipped
copy, every machine starts from the same weights; `base_model(build=True)` rebuilds it instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from iftune.demo.data import pretraining_corpus

# Bump when the corpus, tokenizer or training code changes what gets built.
BUILD_VERSION = "4"  # 4: pre-trained on one thread

BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, *ROLE_TOKENS]

# Assistant content (and its end token) sits inside {% generation %} so that TRL's
# `assistant_only_loss` trains on exactly the answer. Spaces separate every token because the
# tokenizer splits on whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {% generation %}{{ message['content'] }} <|end|>{% endgeneration %} "
    "{% else %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the base model; its hash names the cache folder."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    intermediate_size: int = 512
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    corpus_docs: int = 20000
    batch_size: int = 64
    pretrain_steps: int = 1000
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"version": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread, then restore the count.

    A model this small gains little from more threads on an idle machine and loses a lot when
    the cores are shared (a 2-thread run was 2-5x slower than a 1-thread one beside other jobs).
    It does not make float results the same on every machine (CPU kernels differ): that is why
    the default base model ships with iftune.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_root() -> Path:
    """`$IFTUNE_CACHE`, else `$XDG_CACHE_HOME/iftune`, else `~/.cache/iftune`."""
    if os.environ.get("IFTUNE_CACHE"):
        return Path(os.environ["IFTUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "iftune"


def base_dir(spec: BaseSpec, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"demo-base-{spec.key()}"


SHIPPED_BASE = Path(__file__).with_name("base_model")  # BaseSpec() built once, see docs/demo.md


def base_model(spec: BaseSpec = BaseSpec(), build: bool = False, root: Path | None = None, progress=None) -> Path:
    """Returns the folder of the base model `spec`: the copy shipped with iftune for the default
    spec (unless `build`), else the cached build, built first when missing (see `build_base`)."""
    if spec == BaseSpec() and not build and (SHIPPED_BASE / "config.json").exists():
        return SHIPPED_BASE
    return build_base(spec, root, progress)


def train_tokenizer(corpus: list[str]):
    """A word-level tokenizer trained on the corpus, wrapped for transformers, with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(spec: BaseSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def encode_docs(corpus: list[str], tokenizer) -> list[list[int]]:
    """Each document as `<s> doc <|end|>` token ids."""
    return [
        [tokenizer.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]
        for doc in corpus
    ]


def doc_batch(docs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels). Documents are not packed together: in a
    tiny model attention spread over unrelated earlier documents slows learning a lot."""
    width = max(map(len, docs))
    ids = torch.full((len(docs), width), pad_id)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, doc in enumerate(docs):
        ids[i, : len(doc)] = torch.tensor(doc)
        mask[i, : len(doc)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def pretrain(model, docs: list[list[int]], spec: BaseSpec, pad_id: int, progress=None) -> list[float]:
    """Plain next-token training with AdamW, warm-up and cosine decay; returns the loss per step."""
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / spec.pretrain_steps))
    )
    model.train()
    losses = []
    for _ in range(spec.pretrain_steps):
        picks = torch.randint(len(docs), (spec.batch_size,), generator=gen).tolist()
        ids, mask, labels = doc_batch([docs[i] for i in picks], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(loss.item())
    model.eval()
    return losses


def build_base(spec: BaseSpec = BaseSpec(), root: Path | None = None, progress=None) -> Path:
    """Return the cached base-model folder for `spec`, building it first if it is missing.

    `progress`, if given, is called with the loss after every pre-training step. The folder is
    written under a temporary name and renamed at the end, so an interrupted build leaves no
    half-written cache behind.
    """
    target = base_dir(spec, root)
    if (target / "config.json").exists():
        return target
    torch.manual_seed(spec.seed)
    corpus = pretraining_corpus(spec.corpus_docs, spec.seed)
    tokenizer = train_tokenizer(corpus)
    model = make_model(spec, tokenizer)
    with single_thread():
        losses = pretrain(model, encode_docs(corpus, tokenizer), spec, tokenizer.pad_token_id, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "spec": asdict(spec),
            "build_version": BUILD_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_pretrain_loss": sum(losses[-20:]) / len(losses[-20:]),
        }
        (tmp / "iftune-demo-base.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race with another build: fine
            raise
    return target
