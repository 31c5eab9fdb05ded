"""The model card written into every export (`best/`, `final/`): README.md with the metadata the hub
reads, and loss.svg beside it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCardData

from gpt2kids.hf import HUB_ID
from gpt2kids.loss import perplexity
from gpt2kids.loss_chart import loss_svg

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


def base_model_shown(base_model: str) -> str:
    """How the card's text names the base model: a local folder by its name only (the card is public)."""
    if base_model.startswith("scratch") or hub_base_model(base_model) is not None:
        return base_model
    return f"{Path(base_model).name} (a local folder)"


def for_repo(card: str, repo_id: str) -> str:
    """The card as pushed to `repo_id`: the model it names (model-index, "Use") is that repo, whatever the
    export was written for."""
    from huggingface_hub import ModelCard

    if card.startswith("---\n") and (parsed := ModelCard(card)).data.eval_results:  # model-index: name and results
        parsed.data.model_name = repo_id
        card = parsed.content
    text = re.sub(r'pipeline\("text-generation", model="[^"\n]*", tokenizer="[^"\n]*"\)',
                  f'pipeline("text-generation", model="{repo_id}", tokenizer="{repo_id}")', card)
    return re.sub(r"`python generate\.py --model \S+ ", f"`python generate.py --model {repo_id} ", text)


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
              else f"A GPT-2 fine-tuned from `{facts.base_model}`" if hub_base_model(facts.base_model)
              else f"A GPT-2 fine-tuned from a local folder, `{Path(facts.base_model).name}`")
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
    lines += ["## Training results", "", "![Training and validation loss](loss.svg)", ""]
    if not facts.history:  # a --max-steps stop within the first epoch: a table of no rows would say nothing
        lines.append(f"No epoch has finished: these are the weights at step {facts.step}, within the first epoch.")
    else:
        lines += ["| epoch | step | training loss | validation loss | perplexity |", "| --- | --- | --- | --- | --- |"]
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
