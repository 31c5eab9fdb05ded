"""The README.md model card written into every export (`best/`, `final/`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2kids.training import Run


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


def for_run(run: Run, which: str) -> str:
    """The card of a run's `best/` or `final/` export."""
    config, dataset, progress = run.config, run.dataset, run.progress
    data_name = config.data or "the bundled gpt2kids Indonesian children's stories"
    hyperparameters = {
        "base model": run.base_model, "epochs": config.epochs, "micro-batch": config.batch_size,
        "gradient accumulation": config.grad_accum, "GPUs/processes": run.dist.world_size,
        "block size": dataset.train.inputs.shape[1], "learning rate": config.lr,
        "schedule": f"{config.schedule}, {config.warmup_steps} warm-up steps",
        "optimizer": "AdamW (betas 0.9, 0.999, eps 1e-8)", "weight decay": config.weight_decay,
        "max grad norm": config.max_grad_norm, "precision": run.precision.name, "seed": config.seed,
        "dropout": run.model.config.resid_pdrop,
    }
    description = (f"{data_name}: {dataset.train_stories} training stories ({dataset.train_bytes:,} bytes, "
                   f"{dataset.train.token_count:,} tokens), {dataset.eval_stories} held out")
    note = {"best": f"This is the checkpoint with the lowest validation loss, at step {progress.step}.",
            "final": f"This is the model after step {progress.step} of {run.total_steps}."}[which]
    return render(title=f"gpt2kids: {run.folder.name} ({which})", base_model=run.base_model,
                  data_description=description, hyperparameters=hyperparameters, history=progress.history, note=note)
