"""Chat templates and assistant-only loss: TRL's own test for `{% generation %}` markers and its
training versions of known templates (TRL's shipped templates are real models' templates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl

from conftest import build_model, build_tokenizer
from iftune import cli
from iftune.errors import UserError
from iftune.train import check_chat_template

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# A template of a format TRL does not know, without markers: nothing can patch it.
CUSTOM = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} </s> {% endfor %}"


def tokenizer_with(template: str):
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


def args(model_dir, data, out, *extra) -> list[str]:
    return ["ift", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", *extra]  # fmt: skip


@pytest.mark.parametrize("name", ["qwen2_5", "llama3", "gemma3"])
def test_templates_trl_patches_pass(name):
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tok = tokenizer_with((TRL_TEMPLATES / f"{name}.jinja").read_text())
    assert not has_generation_markers(tok.chat_template)  # the model's own template has none
    check_chat_template(tok, "m", assistant_only_loss=True)
    patched = get_training_chat_template(tok)  # what SFTTrainer swaps in
    chat = [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}]
    mask = tok.apply_chat_template(
        chat, chat_template=patched, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )["assistant_masks"]
    assert 0 < sum(mask) < len(mask)  # the reply is trained, the prompt is not


def test_unpatchable_template_is_one_line_naming_the_options():
    with pytest.raises(UserError) as err:
        check_chat_template(tokenizer_with(CUSTOM), "m", assistant_only_loss=True)
    message = str(err.value)
    assert "\n" not in message and "--chat_template_path" in message and "--assistant_only_loss false" in message
    check_chat_template(tokenizer_with(CUSTOM), "m", assistant_only_loss=False)  # trains on whole conversations
    # "generation" in a template (add_generation_prompt) is not a marker.
    with pytest.raises(UserError):
        check_chat_template(tokenizer_with(CUSTOM + "{% if add_generation_prompt %}[assistant]{% endif %}"), "m", True)


def test_patched_template_trains(tmp_path, chat_file):
    """Llama 3's template without markers: the command trains with TRL's training version."""
    model_dir = tmp_path / "m"
    tok = tokenizer_with((TRL_TEMPLATES / "llama3.jinja").read_text())
    build_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert cli.main(args(model_dir, chat_file, tmp_path / "o", "--logging_steps", "1")) == 0
    history = json.loads((tmp_path / "o" / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in h for h in history)


def test_unpatchable_template_command_exits_2_without_traceback(tmp_path, chat_file, capsys):
    model_dir = tmp_path / "m"
    tok = tokenizer_with(CUSTOM)
    build_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert cli.main(args(model_dir, chat_file, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "--assistant_only_loss false" in err.splitlines()[-1]
    assert cli.main(args(model_dir, chat_file, tmp_path / "o", "--assistant_only_loss", "false")) == 0
