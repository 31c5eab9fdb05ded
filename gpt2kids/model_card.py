"""The README.md model card written into every export (`best/`, `final/`)."""

from __future__ import annotations

from typing import Any


def render(*, title: str, base_model: str, data_description: str, hyperparameters: dict[str, Any],
           history: list[dict[str, Any]], note: str = "") -> str:
    """A Hugging Face model card: what was trained from what, how, and the per-epoch losses."""
    lines = [
        "---",
        "language: id",
        "license: mit",
        "tags:",
        "- gpt2",
        "- text-generation",
        "- gpt2kids",
        "pipeline_tag: text-generation",
        "---",
        "",
        f"# {title}",
        "",
        (f"A GPT-2 trained from {base_model}" if base_model.startswith("scratch")
         else f"A GPT-2 fine-tuned from `{base_model}`")
        + f" on {data_description}, with gpt2kids (a hand-written PyTorch GPT-2 and training loop; "
        "no Hugging Face Trainer).",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += ["## Training hyper-parameters", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in hyperparameters.items()]
    lines += ["", "## Training results", "",
              "| epoch | step | training loss | validation loss | perplexity |",
              "| --- | --- | --- | --- | --- |"]
    for row in history:
        eval_loss = row.get("eval_loss")
        lines.append(
            f"| {row['epoch']} | {row['step']} | {row['train_loss']:.4f} | "
            + (f"{eval_loss:.4f} | {row['perplexity']:.2f} |" if eval_loss is not None else "- | - |"))
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'generator = pipeline("text-generation", model="PATH/TO/THIS/FOLDER", tokenizer="PATH/TO/THIS/FOLDER")',
        'print(generator("Archie sedang mengendarai roket ke planet Mars.", max_new_tokens=60)[0]["generated_text"])',
        "```",
        "",
        "or `python generate.py --model PATH/TO/THIS/FOLDER \"Archie sedang mengendarai roket ke planet Mars.\"`.",
        "",
    ]
    return "\n".join(lines)
