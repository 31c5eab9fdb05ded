"""The model card written into every export (`best/`, `final/`): README.md with the metadata the hub
reads, and loss.svg beside it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from huggingface_hub import EvalResult, ModelCardData

from gpt2kids.hf import HUB_ID
from gpt2kids.loss import perplexity
from gpt2kids.loss_chart import loss_svg

if TYPE_CHECKING:
    from gpt2kids.training import Run

WIDGET_PROMPT = "Archie sedang mengendarai roket ke planet Mars."
TAGS = ["gpt2", "text-generation", "gpt2kids", "indonesian", "children-stories"]


@dataclass
class CardFacts:
    title: str
    base_model: str  # what training started from, as named: a hub id, a local folder, or "scratch (tiny)"
    data_description: str
    hyperparameters: dict[str, Any]
    history: list[dict[str, Any]]  # rows {"epoch", "step", "train_loss", "eval_loss", "perplexity"}
    export: Literal["best", "final"]
    epoch: int
    step: int
    total_steps: int
    stopped_early: str | None = None  # why the run stopped before its last epoch, when it did
    eval_loss: float | None = None  # this export's eval loss; by default the history row at `step`'s
    dataset_name: str = "Indonesian children's stories"
    model_id: str | None = None  # the hub repo it is pushed to, named in "Use"; a placeholder without it


def hub_base_model(base_model: str) -> str | None:
    """The `base_model` metadata: a hub id only (the hub links it); None for scratch or a local folder."""
    if base_model.startswith("scratch") or not HUB_ID.match(base_model) or Path(base_model).exists():
        return None
    return base_model


def _export_eval_loss(facts: CardFacts) -> float | None:
    if facts.eval_loss is not None:
        return facts.eval_loss
    rows = [row for row in facts.history if row["step"] == facts.step and row.get("eval_loss") is not None]
    return rows[-1]["eval_loss"] if rows else None


def card_data(facts: CardFacts) -> ModelCardData:
    eval_loss = _export_eval_loss(facts)
    results = None
    if eval_loss is not None:
        common = {"task_type": "text-generation", "task_name": "Text Generation", "dataset_name": facts.dataset_name,
                  "dataset_type": re.sub(r"[^a-z0-9]+", "-", facts.dataset_name.lower().replace("'", "")).strip("-"),
                  "dataset_split": "validation"}
        results = [EvalResult(metric_type="loss", metric_name="Eval loss", metric_value=round(eval_loss, 4), **common),
                   EvalResult(metric_type="perplexity", metric_name="Perplexity",
                              metric_value=round(perplexity(eval_loss), 2), **common)]
    return ModelCardData(language="id", license="mit", library_name="transformers",
                         base_model=hub_base_model(facts.base_model), tags=TAGS, pipeline_tag="text-generation",
                         widget=[{"text": WIDGET_PROMPT}], model_name=facts.model_id or facts.title,
                         eval_results=results)


def _body(facts: CardFacts) -> list[str]:
    origin = (f"A GPT-2 trained from {facts.base_model}" if facts.base_model.startswith("scratch")
              else f"A GPT-2 fine-tuned from `{facts.base_model}`")
    eval_loss = _export_eval_loss(facts)
    scores = (f" (validation loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f})"
              if eval_loss is not None else "")
    which = (f"This is `best/`: the weights at epoch {facts.epoch}, step {facts.step}, the lowest validation loss "
             f"of the run{scores}." if facts.export == "best" else
             f"This is `final/`: the weights after step {facts.step} of {facts.total_steps} "
             f"(epoch {facts.epoch}){scores}.")
    lines = [f"# {facts.title}", "",
             f"{origin} on {facts.data_description}, with gpt2kids (a hand-written PyTorch GPT-2 and training "
             "loop; no Hugging Face Trainer).", "", which, ""]
    if facts.stopped_early:
        lines += [f"The run stopped early: {facts.stopped_early}.", ""]
    lines += ["## Training results", "", "![Training and validation loss](loss.svg)", "",
              "| epoch | step | training loss | validation loss | perplexity |", "| --- | --- | --- | --- | --- |"]
    for row in facts.history:
        eval_part = ("- | - |" if row.get("eval_loss") is None
                     else f"{row['eval_loss']:.4f} | {row['perplexity']:.2f} |")
        lines.append(f"| {row['epoch']} | {row['step']} | {row['train_loss']:.4f} | {eval_part}")
    lines += ["", "## Training hyper-parameters", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in facts.hyperparameters.items()]
    model = facts.model_id or "PATH/TO/THIS/FOLDER"
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              f'generator = pipeline("text-generation", model="{model}", tokenizer="{model}")',
              f'print(generator("{WIDGET_PROMPT}", max_new_tokens=60)[0]["generated_text"])', "```", "",
              f'or, with gpt2kids: `python generate.py --model {model} "{WIDGET_PROMPT}"`', ""]
    return lines


def card_files(facts: CardFacts) -> dict[str, str]:
    """{"README.md": the model card, "loss.svg": the loss picture it embeds}."""
    readme = f"---\n{card_data(facts).to_yaml()}\n---\n\n" + "\n".join(_body(facts))
    return {"README.md": readme, "loss.svg": loss_svg(facts.history)}


def for_run(run: Run, which: str) -> dict[str, str]:
    """The card files of a run's `best/` or `final/` export, at the run's current step."""
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
    stopped = progress.stopped_early
    if stopped is None and which == "final" and progress.step < run.total_steps:
        stopped = f"--max-steps {config.max_steps}"
    facts = CardFacts(
        title=f"gpt2kids: {run.folder.name} ({which})", base_model=run.base_model, data_description=description,
        hyperparameters=hyperparameters, history=list(progress.history), export=which,
        epoch=progress.epoch + 1 if progress.step_in_epoch else progress.epoch, step=progress.step,
        total_steps=run.total_steps, stopped_early=stopped,
        eval_loss=progress.best_eval_loss if which == "best" else None, model_id=config.push_to_hub,
        **({"dataset_name": Path(config.data).name} if config.data else {}))
    return card_files(facts)
