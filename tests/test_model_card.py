"""The model card: hub metadata that round-trips, the per-epoch table, and the loss picture beside it."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest
from conftest import config_for
from huggingface_hub import ModelCard

from gpt2kids.model_card import WIDGET_PROMPT, CardFacts, card_files, hub_base_model

SVG = "{http://www.w3.org/2000/svg}"
EVAL_LOSSES = [4.02, 3.91, 3.85, 3.86]  # the lowest is epoch 3's


def history(eval_losses: list[float | None]) -> list[dict]:
    return [{"epoch": epoch, "step": 25 * epoch, "train_loss": 4.5 - 0.2 * epoch, "eval_loss": loss,
             "perplexity": math.exp(loss) if loss is not None else None}
            for epoch, loss in enumerate(eval_losses, start=1)]


def facts(**overrides) -> CardFacts:
    settings = dict(title="gpt2kids: demo (best)", base_model="flax-community/gpt2-small-indonesian",
                    data_description="the bundled stories", hyperparameters={"learning rate": 5e-5, "epochs": 4},
                    history=history(EVAL_LOSSES), export="best", epoch=3, step=75, total_steps=100)
    return CardFacts(**{**settings, **overrides})


def table_rows(readme: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in readme.splitlines() if re.match(r"^\| \d+ \| \d+ \|", line)]


def metrics(card: ModelCard) -> dict[str, float]:
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    return [[tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
            for line in root.iter(f"{SVG}polyline")]


def test_metadata_round_trips_through_model_card_load(tmp_path):
    files = card_files(facts())
    (tmp_path / "README.md").write_text(files["README.md"], encoding="utf-8")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.language, data.license, data.pipeline_tag) == ("id", "mit", "text-generation")
    assert data.base_model == "flax-community/gpt2-small-indonesian"
    assert {"gpt2", "text-generation", "gpt2kids", "indonesian", "children-stories"} <= set(data.tags)
    assert data.widget == [{"text": WIDGET_PROMPT}]
    # best/ carries the lowest eval loss of the run (epoch 3), not the last one (epoch 4).
    assert metrics(card) == {"loss": round(3.85, 4), "perplexity": round(math.exp(3.85), 2)}
    result = data.eval_results[0]
    assert (result.task_type, result.dataset_name, result.dataset_split) == (
        "text-generation", "Indonesian children's stories", "validation")
    assert result.dataset_type == "indonesian-childrens-stories"


def test_final_export_reports_its_last_eval_and_scratch_has_no_base_model():
    card = ModelCard(card_files(facts(base_model="scratch (tiny)", export="final", epoch=4, step=100))["README.md"])
    assert card.data.base_model is None
    assert "scratch (tiny)" in card.text
    assert metrics(card) == {"loss": 3.86, "perplexity": round(math.exp(3.86), 2)}
    assert "This is `final/`: the weights after step 100 of 100 (epoch 4)" in card.text


def test_an_explicit_eval_loss_wins_for_a_best_export_between_epochs():
    # --eval-every: best/ is exported mid-epoch, its eval loss is in no per-epoch row.
    card = ModelCard(card_files(facts(epoch=4, step=90, eval_loss=3.5))["README.md"])
    assert metrics(card) == {"loss": 3.5, "perplexity": round(math.exp(3.5), 2)}
    assert "`best/`: the weights at epoch 4, step 90, the lowest validation loss of the run" in card.text


def test_body_has_one_row_per_epoch_and_names_the_export():
    readme = card_files(facts())["README.md"]
    assert "| epoch | step | training loss | validation loss | perplexity |" in readme
    rows = table_rows(readme)
    assert [row[:2] for row in rows] == [["1", "25"], ["2", "50"], ["3", "75"], ["4", "100"]]
    assert rows[2][3:] == ["3.8500", f"{math.exp(3.85):.2f}"]
    assert "This is `best/`: the weights at epoch 3, step 75, the lowest validation loss of the run" in readme
    assert "![Training and validation loss](loss.svg)" in readme
    assert "| learning rate | 5e-05 |" in readme
    assert 'pipeline("text-generation", model="PATH/TO/THIS/FOLDER"' in readme
    assert "The run stopped early" not in readme


def test_an_early_stop_is_stated_and_a_repo_id_is_used_in_the_use_section():
    readme = card_files(facts(export="final", epoch=2, step=50, history=history(EVAL_LOSSES[:2]),
                              stopped_early="--max-steps 50", model_id="me/kids"))["README.md"]
    assert "The run stopped early: --max-steps 50." in readme
    assert "after step 50 of 100 (epoch 2)" in readme
    assert len(table_rows(readme)) == 2
    assert 'model="me/kids"' in readme and "python generate.py --model me/kids" in readme
    assert ModelCard(readme).data.to_dict()["model-index"][0]["name"] == "me/kids"


def test_without_held_out_data_there_are_no_results_and_one_line_in_the_picture():
    files = card_files(facts(history=history([None, None, None]), export="final", epoch=3, step=75))
    card = ModelCard(files["README.md"])
    assert card.data.eval_results is None and "model-index" not in files["README.md"]
    assert [row[3:] for row in table_rows(files["README.md"])] == [["-", "-"]] * 3
    [train_line] = polylines(files["loss.svg"])
    assert len(train_line) == 3


def test_a_stop_within_the_first_epoch_has_a_line_instead_of_an_empty_table():
    files = card_files(facts(history=[], export="final", epoch=0, step=3, stopped_early="--max-steps 3"))
    assert "| epoch | step |" not in files["README.md"]
    assert "No epoch has finished: these are the weights at step 3, within the first epoch." in files["README.md"]
    assert "no epoch finished yet" in files["loss.svg"]


def test_the_picture_has_a_point_per_epoch_with_lower_loss_drawn_higher():
    svg = card_files(facts())["loss.svg"]
    root = ET.fromstring(svg)
    train_line, eval_line = polylines(svg)
    assert len(train_line) == len(eval_line) == len(EVAL_LOSSES)
    assert [x for x, _ in train_line] == sorted(x for x, _ in train_line) and len({x for x, _ in train_line}) == 4
    # SVG's y grows downwards: a falling training loss is a rising line.
    assert [y for _, y in train_line] == sorted(y for _, y in train_line)
    eval_ys = [y for _, y in eval_line]
    assert eval_ys.index(max(eval_ys)) == 2  # the lowest eval loss (epoch 3) is the lowest point
    texts = [text.text for text in root.iter(f"{SVG}text")]
    assert {"training loss", "validation loss", "epoch", "loss"} <= set(texts)
    assert {"1", "2", "3", "4"} <= set(texts)  # the epoch ticks


@pytest.mark.parametrize("rows", [history([4.0]), [dict(row, train_loss=2.0) for row in history([2.0, 2.0, 2.0])]],
                         ids=["one epoch", "equal values"])
def test_the_picture_copes_with_one_epoch_and_flat_losses(rows):
    lines = polylines(card_files(facts(history=rows, epoch=1, step=25))["loss.svg"])
    assert len(lines) == 2 and all(len(line) == len(rows) for line in lines)
    assert all(math.isfinite(value) for line in lines for point in line for value in point)
    assert 0 <= min(x for line in lines for x, _ in line) and max(x for line in lines for x, _ in line) <= 640


def test_hub_base_model_is_only_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert hub_base_model("flax-community/gpt2-small-indonesian") == "flax-community/gpt2-small-indonesian"
    assert hub_base_model("runs/demo") is None  # a local folder that looks like owner/name
    assert hub_base_model("scratch (tiny)") is None
    assert hub_base_model(str(tmp_path / "init")) is None


def test_a_local_base_model_is_named_by_its_folder_name_only():
    """The card is public: it names a local --init folder, never the path on the machine that trained it."""
    from gpt2kids.model_card import base_model_shown

    readme = card_files(facts(base_model="/home/ani/models/init"))["README.md"]
    assert "A GPT-2 fine-tuned from a local folder, `init`" in readme and "/home/ani" not in readme
    assert ModelCard(readme).data.base_model is None
    assert base_model_shown("/home/ani/models/init") == "init (a local folder)"  # the settings table's entry


def test_export_writes_the_card_files_into_the_folder(tmp_path, tokenizer):
    from gpt2kids.config import GPT2Config
    from gpt2kids.hf import export
    from gpt2kids.model import GPT2

    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    files = card_files(facts())
    assert set(files) == {"README.md", "loss.svg"}
    export(GPT2(config), tokenizer, tmp_path / "best", card_files=files)
    for name, text in files.items():
        assert (tmp_path / "best" / name).read_text(encoding="utf-8") == text
    assert not list(tmp_path.glob(".best.*"))


def test_a_training_run_writes_cards_for_best_and_final(tmp_path, init_folder, corpus):
    from gpt2kids.training import train

    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=2, block_size=32, batch_size=8))
    losses = [row["eval_loss"] for row in progress.history]
    best_epoch = losses.index(min(losses)) + 1
    best = ModelCard.load(out / "best" / "README.md")
    assert metrics(best)["loss"] == round(min(losses), 4)
    # best/ is written before the epoch's row is recorded; its card still holds that row.
    assert len(table_rows(best.text)) == best_epoch
    assert f"epoch {best_epoch}, step {progress.history[best_epoch - 1]['step']}" in best.text
    final = ModelCard.load(out / "final" / "README.md")
    assert metrics(final)["loss"] == round(losses[-1], 4) and len(table_rows(final.text)) == 2
    assert final.data.base_model is None  # started from a local folder, not a hub id
    for card in (best, final):  # named by its folder's name, not its path on this machine
        assert f"| base model | {init_folder.name} (a local folder) |" in card.text
        assert str(init_folder) not in card.text
    assert len(polylines((out / "final" / "loss.svg").read_text())[1]) == 2



def test_the_card_counts_the_training_tokens_and_names_the_set_it_evaluated_on(tmp_path, init_folder, corpus):
    from gpt2kids import data
    from gpt2kids.tokenizer import Tokenizer
    from gpt2kids.training import train

    held_out = tmp_path / "held-out.txt"
    held_out.write_text("Pada suatu hari, Kancil pergi ke sungai.\n\nBudi membaca buku cerita.", encoding="utf-8")
    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, epochs=1, eval_data=str(held_out)))
    card = ModelCard.load(out / "final" / "README.md")
    # Every token of the training stories, end-of-text included (not the loss targets: one fewer per block).
    tokens = len(data.tokenize_stories(data.read_stories(corpus), Tokenizer.from_path(init_folder)))
    assert f"{tokens:,} tokens)" in card.text
    [result] = [result for result in card.data.eval_results if result.metric_type == "loss"]
    assert result.dataset_name == "held-out.txt"  # the loss was measured there, not on --data
