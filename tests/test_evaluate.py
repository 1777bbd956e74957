"""Evaluation outputs of the default run: task accuracy per family from greedy generations with
the chat template, side-by-side samples, training plots, run info; lm-eval on a local task."""

import csv
import json
import sys

import datasets
import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

from shardtune.config import resolve_runs
from shardtune.errors import UserError
from shardtune.inputs.builtin_data import TASKS

PNG = b"\x89PNG\r\n\x1a\n"


def read_json(path):
    return json.loads(path.read_text())


def raw_test(demo_run):
    return datasets.load_from_disk(str(next((demo_run / "resources/datasets").iterdir()) / "data"))["test"]


def test_task_accuracy_per_family_base_and_tuned(demo_run):
    metrics = read_json(demo_run / "results/demo/eval/metrics.json")
    per_task = metrics["generation"]["per_task"]
    assert per_task == 20 and metrics["generation"]["decoding"] == "greedy"
    assert set(metrics["task_accuracy"]) == set(TASKS)
    for result in metrics["task_accuracy"].values():
        assert result["n"] == per_task and 0 <= result["base"] <= 1 and 0 <= result["tuned"] <= 1
    rows = {r["task"]: r for r in csv.DictReader((demo_run / "results/demo/eval/accuracy.tsv").open(), delimiter="\t")}
    assert set(rows) == set(TASKS) | {"all"} and int(rows["all"]["n"]) == per_task * len(TASKS)
    for model in ("base", "tuned"):
        overall = sum(r[model] for r in metrics["task_accuracy"].values()) / len(TASKS)
        assert metrics[model]["accuracy"] == pytest.approx(overall)
        assert float(rows["all"][model]) == pytest.approx(overall, abs=1e-4)


def test_task_accuracy_agrees_with_the_generations_and_the_references(demo_run):
    """Per task, the accuracy is bounded by the side-by-side samples' own verdicts (they are
    among the scored prompts), and the constant-answer baseline is the share of the most
    common reference among the scored conversations, recomputed here from the raw test set."""
    from collections import Counter

    metrics = read_json(demo_run / "results/demo/eval/metrics.json")
    per_task = metrics["generation"]["per_task"]
    samples = [json.loads(line) for line in (demo_run / "results/demo/eval/samples.jsonl").read_text().splitlines()]
    test = raw_test(demo_run)
    scored = {}
    for i, task in enumerate(test["task"]):
        if len(scored.setdefault(task, [])) < per_task:
            scored[task].append(i)
    for task, result in metrics["task_accuracy"].items():
        n = result["n"]
        for model in ("base", "tuned"):
            verdicts = [s[f"{model}_correct"] for s in samples if s["task"] == task]
            assert sum(verdicts) / n <= result[model] <= 1 - verdicts.count(False) / n, (task, model)
            assert 1 <= result[f"{model}_distinct"] <= n
        references = Counter(test[i]["messages"][-1]["content"].strip() for i in scored[task])
        assert result["constant_answer"] == pytest.approx(max(references.values()) / n), task


def test_samples_are_the_first_test_conversations_side_by_side(demo_run):
    samples = [json.loads(line) for line in (demo_run / "results/demo/eval/samples.jsonl").read_text().splitlines()]
    test = raw_test(demo_run)
    assert [s["index"] for s in samples] == list(range(8))
    for s in samples:
        messages = test[s["index"]]["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert s["prompt"] == [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        assert s["reference"] == messages[last]["content"] and s["task"] == test[s["index"]]["task"]
        for model in ("base", "tuned"):
            assert isinstance(s[model], str)
            assert s[f"{model}_correct"] == (s[model] == s["reference"])
    assert any(s["base"] != s["tuned"] for s in samples)


def test_tuned_samples_are_greedy_generations_with_the_chat_template(demo_run):
    """Regenerate the first sample one prompt at a time with plain transformers."""
    sample = json.loads((demo_run / "results/demo/eval/samples.jsonl").read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(next((demo_run / "resources/prepared").glob("*/tokenizer")))
    model = AutoPeftModelForCausalLM.from_pretrained(demo_run / "results/demo/adapter", dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(sample["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=32, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text == sample["tuned"]


def test_training_plots_are_pngs(demo_run):
    for name in ("loss", "learning_rate", "throughput"):
        data = (demo_run / f"results/demo/eval/{name}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name


def test_run_info_has_resolved_settings_and_versions(demo_run):
    info = read_json(demo_run / "results/demo/eval/run_info.json")
    assert info["settings"] == json.loads(json.dumps(resolve_runs(default_config_of(demo_run))["demo"]))
    import peft
    import transformers

    assert info["versions"]["transformers"] == transformers.__version__
    assert info["versions"]["peft"] == peft.__version__ and info["versions"]["torch"]
    assert info["training"]["global_step"] == read_json(demo_run / "results/demo/train/done.json")["global_step"]
    assert info["conversion"]["checkpoint"].startswith("checkpoint-")


def default_config_of(workdir):
    import yaml

    return yaml.safe_load((workdir / "config.yaml").read_text())


def test_lm_eval_without_the_package_names_the_extra(monkeypatch):
    from shardtune.evaluate.evaluation import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    settings = resolve_runs({"evaluate": {"lm_eval_tasks": ["hellaswag"]}})["demo"]
    with pytest.raises(UserError, match=r"lm-eval is not installed: pip install 'shardtune\[lm-eval\]'"):
        run_lm_eval(None, None, settings, print)


LOCAL_TASK = """task: shardtune_addition
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "What is {{{{a}}}} + {{{{b}}}}?"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_runs_a_local_custom_task_on_the_tuned_model(demo_run, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is optional (extra 'lm-eval'); install it to run this test")
    from peft import PeftModel

    from shardtune.evaluate.evaluation import run_lm_eval
    from shardtune.inputs.modeling import load_base_model

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"a": a, "b": b, "answer": str(a + b)} for a, b in [(1, 2), (10, 5), (7, 7), (40, 2), (3, 30), (9, 9)]]
    (tasks / "addition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "shardtune_addition.yaml").write_text(LOCAL_TASK.format(data=tasks / "addition.jsonl"))

    settings = resolve_runs(
        {"evaluate": {"lm_eval_tasks": ["shardtune_addition"], "lm_eval_include": str(tasks), "lm_eval_limit": 4}}
    )["demo"]
    adapter = demo_run / "results/demo/adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = load_base_model(next((demo_run / "resources/models").iterdir()), settings, len(tokenizer))
    model = PeftModel.from_pretrained(base, adapter).eval()
    result = run_lm_eval(model, tokenizer, settings, print)
    task = result["results"]["shardtune_addition"]
    assert task["sample_len"] == 4 and 0 <= task["exact_match,none"] <= 1
    assert result["tasks"] == ["shardtune_addition"]

    settings["evaluate"]["lm_eval_tasks"] = ["no_such_task"]
    with pytest.raises(UserError, match="unknown task"):
        run_lm_eval(model, tokenizer, settings, print)


def test_generation_prompts_are_read_in_any_data_format():
    from shardtune.evaluate.evaluation import conversation_reader
    from shardtune.evaluate.generation import split_conversation

    data = resolve_runs({})["demo"]["data"]
    sharegpt = datasets.Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
    )
    pairs = datasets.Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": "4"}])
    for test, expected in ((sharegpt, ("Hi?", "Hello.")), (pairs, ("What is 2 + 2?", "4"))):
        prompt, reference = split_conversation(conversation_reader(test, data)(test[0]))
        assert prompt == [{"role": "user", "content": expected[0]}] and reference == expected[1]
    broken = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "no answer"}]}])
    assert conversation_reader(broken, data)(broken[0]) is None
    assert conversation_reader(datasets.Dataset.from_list([{"text": "plain"}]), data) is None
