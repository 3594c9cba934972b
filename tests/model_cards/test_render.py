"""Model cards from result files: render -> parse round trip, numbers taken from the files, metadata checks, and the
committed catalogue matching its results."""

import copy
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_effattn.model_cards import CardError, check_card, find_local_paths, load_results, render_card
from hf_effattn.model_cards.catalogue import ROOT, build_catalogue, index_page
from hf_effattn.model_cards.render import Results

GDN_RESULTS = ROOT / "results" / "smollm2-gdn"
HEADER = "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [custom_code]\n"


@pytest.fixture(scope="module")
def gdn_results():
    return load_results(GDN_RESULTS)


def test_render_parse_round_trip(gdn_results):
    text = render_card(gdn_results, "smollm2-gdn", repo_id="my-org/smollm2-gdn", revision="0123abcd")
    card = ModelCard(text)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.to_dict()["base_model_relation"] == "finetune" and data.license == "apache-2.0"
    assert {"hf_effattn", "custom_code", "gdn", "hybrid"} <= set(data.tags)
    # model-index: one entry per task and length, each value the one in evaluation.json
    evaluation = gdn_results.evaluation
    expected = {(task, int(length)): score for task, by_length in evaluation["scores"]["model"].items()
                for length, score in by_length.items()}
    parsed = {(r.dataset_type.split("/")[1], int(r.dataset_config)): r.metric_value for r in data.eval_results}
    assert parsed == expected
    assert {r.metric_type for r in data.eval_results} == set(evaluation["metrics"].values())
    # the body: pinned snippets, the layout, the recipe, both tables, limitations, one-command reproduction
    body = card.text
    assert 'repo, revision = "my-org/smollm2-gdn", "0123abcd"' in body and "trust_remote_code=True" in body
    assert 'import hf_effattn' in body
    layout = gdn_results.conversion["layout"]["mixer_types"]
    assert "".join("F" if kind == "full" else "G" for kind in layout) in body
    for heading in ("## Layout", "## How it was made", "### Retention against the teacher", "### Speed and memory",
                    "## Limitations", "## Reproduce"):
        assert heading in body
    assert f"{gdn_results.conversion['stage2']['tokens']:,}" in body
    assert "hf-effattn convert" in body and "hf-effattn eval smollm2-gdn" in body and "hf-effattn bench" in body
    assert find_local_paths(text) == []


def test_every_number_comes_from_the_result_files(gdn_results):
    results = copy.deepcopy(gdn_results)
    results.evaluation["scores"]["model"]["passkey"]["4096"] = 12.345
    results.evaluation["retention"]["passkey"]["4096"] = 0.1411
    results.efficiency[0][1]["ratios"][-1]["compiled_ms_per_step_speedup"] = 7.654
    results.conversion["stage2"]["tokens"] = 123457
    text = render_card(results, "smollm2-gdn")
    assert "12.3 / " in text and "(0.14)" in text and "7.65x" in text and "123,457" in text
    values = {(r.dataset_type, r.dataset_config): r.metric_value for r in ModelCard(text).data.eval_results}
    assert values[("hf_effattn/passkey", "4096")] == 12.345


def test_card_without_evaluation_and_a_local_teacher():
    report = json.loads((GDN_RESULTS / "conversion_report.json").read_text())
    report.update(teacher="my-teacher", teacher_spec="my-teacher")
    text = render_card(Results(report), "local-hybrid")
    data = ModelCard(text).data
    # no hub id for the teacher: no base_model, and no license is invented
    assert data.base_model is None and data.license == "other" and data.eval_results is None
    assert "license was not recorded" in text and "--teacher my-teacher" in text
    assert "your-org/local-hybrid" in text and "### Retention" not in text


@pytest.mark.parametrize(
    ("mixer", "full_layers", "window", "tags", "phrases"),
    [
        ("sliding", [1, 5], 512, {"sliding", "sliding-window-attention", "hybrid"},
         ["softmax attention over the last 512 tokens and 4 sink tokens", "--mixer sliding --window 512"]),
        ("gdn", [], 0, {"gdn", "linear-attention"},
         ["no full-attention layer", "fixed-size fp32 recurrent state only", "--full-share 0.0 --window 0"]),
    ],
    ids=["sliding-with-sinks", "pure-linear"],
)
def test_other_conversions_render(mixer, full_layers, window, tags, phrases):
    report = json.loads((GDN_RESULTS / "conversion_report.json").read_text())
    kinds = ["full" if i in full_layers else mixer for i in range(len(report["layout"]["mixer_types"]))]
    report["layout"].update(mixer_types=kinds, full_layers=full_layers)
    report["recipe"].update(mixer=mixer, window=window, full_share=0.0 if not full_layers else 0.25)
    text = render_card(Results(report), "variant")
    data = ModelCard(text).data
    assert tags <= set(data.tags) and ("hybrid" in data.tags) == bool(full_layers)
    for phrase in phrases:
        assert phrase in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# no front matter\n", "has no YAML front matter"),
        ("---\nlibrary_name: [transformers\n---\n", "does not parse"),
        ("---\nlibrary_name: peft\npipeline_tag: text-generation\ntags: [custom_code]\n---\n",
         "library_name is 'peft', expected 'transformers'"),
        ("---\nlibrary_name: transformers\ntags: [custom_code]\n---\n", "pipeline_tag is None"),
        ("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [hf_effattn]\n---\n",
         "tags lack 'custom_code'"),
        (f"{HEADER}base_model: /home/me/teacher\n---\n", "base_model '/home/me/teacher' is not a hub id"),
        (f"{HEADER}base_model: org/teacher\nbase_model_relation: distilled\n---\n", "base_model_relation 'distilled'"),
    ],
    ids=["no-front-matter", "bad-yaml", "library", "pipeline", "custom-code", "local-base-model", "relation"],
)
def test_check_card_names_each_problem(text, message):
    with pytest.raises(CardError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_card(text)


def test_find_local_paths():
    text = ('"spec": "/root/runs/smollm2-gdn" see https://huggingface.co/org/name, 3/4 of a/b/c, tokens / s, '
            "~/models/x and C:\\Users\\me\\model and file:///tmp/x")
    assert find_local_paths(text) == ["/root/runs/smollm2-gdn", "C:\\Users", "file:///tmp/x", "~/models/x"]
    assert find_local_paths("model_cards/results/smollm2-gdn and `hf_effattn/passkey`") == []


def test_catalogue_renders_every_results_folder(gdn_results, tmp_path):
    for name in ("model-a", "model-b"):
        shutil.copytree(GDN_RESULTS, tmp_path / "results" / name)
    (tmp_path / "results" / "model-b" / "evaluation.json").unlink()
    written = build_catalogue(tmp_path, log=lambda *a: None)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["model-a/README.md", "model-b/README.md",
                                                                       "README.md"]
    index = (tmp_path / "README.md").read_text()
    assert "| [model-a](model-a/README.md) |" in index and "| [model-b](model-b/README.md) |" in index
    assert "hf-effattn convert" in index and "not evaluated" in index
    assert ModelCard.load(tmp_path / "model-b" / "README.md").data.eval_results is None


def test_committed_catalogue_matches_its_results():
    """The cards under model_cards/ are exactly what `hf-effattn catalogue` renders from model_cards/results/."""
    folders = sorted(p for p in (ROOT / "results").glob("*") if (p / "conversion_report.json").is_file())
    assert folders, "model_cards/results/ holds no results folder"
    entries = []
    for folder in folders:
        results = load_results(folder)
        entries.append((folder.name, results))
        card = ROOT / folder.name / "README.md"
        assert card.is_file() and card.read_text() == render_card(results, folder.name, catalogue=True), (
            f"{card} is out of date: run `hf-effattn catalogue`")
    assert (ROOT / "README.md").read_text() == index_page(entries), "run `hf-effattn catalogue`"


def test_results_folder_errors(tmp_path):
    with pytest.raises(CardError, match="has no conversion_report.json"):
        load_results(tmp_path)
    (tmp_path / "conversion_report.json").write_text("{}")
    with pytest.raises(CardError, match="lacks 'teacher'"):
        load_results(tmp_path)
    shutil.copy(GDN_RESULTS / "conversion_report.json", tmp_path)
    with pytest.raises(CardError, match="not a hub repository id"):
        render_card(load_results(tmp_path), "x", repo_id="/home/me/x")
    assert Path(tmp_path / "conversion_report.json").is_file()


def test_index_cell_of_an_efficiency_run_whose_baseline_ran_out_of_memory():
    """A 1M-token run has no speed-up (the all-full model did not fit): the index says what its targets say."""
    from hf_effattn.model_cards.catalogue import _efficiency_cell
    from hf_effattn.model_cards.render import load_results

    results = load_results(ROOT / "results" / "smollm2-gdn")
    names = [name for name, _ in results.efficiency]
    assert "efficiency-1.5b-1m.json" in names
    cell = _efficiency_cell(results)
    assert "1,048,576 tokens, batch 1: hybrid prefills and decodes 1,048,576 tokens, full runs out of memory" in cell
    assert ": ;" not in cell and "compiled decode" in cell
