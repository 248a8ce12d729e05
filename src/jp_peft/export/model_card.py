"""The model cards of a trained stage's export: README.md in hf_adapter/ and hf_merged/, in the Hugging Face
model-card format (YAML front matter built with huggingface_hub's ModelCardData, then markdown).

Everything on a card comes from the run's records: the export record (artifacts, checks, deployability), the
stage's metrics.json, the spec (method, LoRA shape, data), the data stage's record (token counts) and, when the
eval stage has run, eval/results.json (the `model-index`). Written by the export stage and rewritten by the eval
stage (jp_peft.run.entry), both backends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jp_peft.export import deployability as deploy
from jp_peft.records import layout as rundir
from jp_peft.records.export_record import ExportRecord
from jp_peft.records.metrics import StageMetrics, read_stage_metrics, relative_forgetting, relative_gain
from jp_peft.spec import ExperimentSpec
from jp_peft.spec.stages import BLEND, PREFERENCE, previous_trained, stage as stage_row, trained_with

CARD = "README.md"
LANGUAGES = ["ja", "en"]
# Qwen2.5-0.5B is released under Apache-2.0 (its Hub card, Qwen/Qwen2.5-0.5B, says `license: apache-2.0`): the
# license of a base that carries no card of its own but has Qwen2.5-0.5B's architecture.
QWEN25_LICENSE = "apache-2.0"
METHOD_WHAT = {"lora": "LoRA", "lora_embed": "LoRA + trainable input embeddings and output layer (PEFT modules_to_save)",
               "full": "full fine-tuning (every parameter)"}


def base_license(spec: ExperimentSpec) -> tuple[str, str]:
    """(license id, where it comes from) of the run's base model: its own card if it has one, else Qwen2.5-0.5B's
    Apache-2.0 for a base of that architecture, else `other`."""
    if spec.model.tiny:
        return "apache-2.0", ("the embedded tiny Qwen2 (jp_peft.tiny), a test model that jp-peft builds from its "
                              "own CC0-1.0 bundled samples (data/README.md): under jp-peft's Apache-2.0 license")
    from huggingface_hub import ModelCard

    base = rundir.base_model_dir(spec)
    card = Path(base) / CARD if Path(base).is_dir() else _cached_hub_file(base, CARD)
    if card is not None and Path(card).is_file():
        license_id = ModelCard.load(card).data.license
        if license_id:
            return license_id, f"read from the base model's card ({card})"
    config = Path(base) / "config.json" if Path(base).is_dir() else _cached_hub_file(base, "config.json")
    if config is not None and Path(config).is_file() and _is_qwen25_05b(json.loads(Path(config).read_text())):
        return QWEN25_LICENSE, ("Qwen2.5-0.5B's license (Apache-2.0, its Hub card Qwen/Qwen2.5-0.5B); the base "
                                f"directory {base} has no card to read it from")
    return "other", f"the base model {base} names no license; check its terms before publishing"


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a repo id
        return None
    return found if isinstance(found, str) else None


def _is_qwen25_05b(config: dict) -> bool:
    from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG

    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return all(config.get(k) == QWEN25_05B_HF_CONFIG[k] for k in keys)


def lineage(spec: ExperimentSpec, stage: str) -> list[str]:
    """The trained stages behind a stage's merged model, first to last (sft: cpt, sft)."""
    chain = [stage]
    while (previous := previous_trained(chain[0], spec.stages)) is not None:
        chain.insert(0, previous)
    return chain


def stage_datasets(spec: ExperimentSpec, stage: str) -> list[str]:
    """What a stage trained on: its blend's sources (an entry without sources: its prefix), its SFT files, or its
    preference pairs."""
    data = spec.stage(stage).data
    if stage in trained_with(BLEND):
        return [s for entry in data.blend for s in (entry.source or (entry.prefix,))]
    if stage in trained_with(PREFERENCE):
        return list(data.train_source) or [data.train]
    return list(data.sft_source) or [data.sft_train]


def card_datasets(spec: ExperimentSpec, stage: str, artifact: str) -> list[str]:
    """The adapter learned from its own stage's data; the merged model from every stage behind it."""
    stages = [stage] if artifact == "hf_adapter" else lineage(spec, stage)
    return [d for s in stages for d in stage_datasets(spec, s)]


def eval_results(results: dict[str, Any] | None, stage: str) -> list:
    """The stage's scores in eval/results.json as model-index entries: one per task, its primary metric in
    lm-eval's units (accuracy 0-1)."""
    from huggingface_hub import EvalResult

    record = (results or {}).get("models", {}).get(stage)
    if record is None:
        return []
    return [EvalResult(task_type="text-generation", task_name="lm-evaluation-harness", dataset_type=task,
                       dataset_name=task, dataset_split=f"first {entry['n']} of {entry['n_total']} items",
                       metric_type=entry["metric"], metric_value=entry["value"],
                       metric_name=f"{entry['metric']} ({entry['num_fewshot']}-shot)")
            for task, entry in record["tasks"].items()]


def card_data(spec: ExperimentSpec, stage: str, record: ExportRecord, artifact: str, metrics: StageMetrics,
              results: dict[str, Any] | None, license_id: str):
    from huggingface_hub import ModelCardData

    adapter = artifact == "hf_adapter"
    tags = ["jp-peft", stage, metrics.method, "japanese", "qwen2", f"{metrics.backend}-backend"]
    if spec.model.tiny:
        tags.append("tiny-test-model")
    if adapter:
        tags.append("lora")
    evals = eval_results(results, stage)
    return ModelCardData(
        base_model=record.adapter_base if adapter else metrics.base_model,
        library_name="peft" if adapter else "transformers", language=list(LANGUAGES), license=license_id,
        tags=sorted(set(tags), key=tags.index), datasets=card_datasets(spec, stage, artifact),
        pipeline_tag="text-generation", model_name=f"{deploy.served_name(spec, stage)}-{artifact}",
        eval_results=evals or None)


def refresh_cards(spec: ExperimentSpec, stage: str, record: ExportRecord) -> list[Path]:
    """The cards again after a later check added a verified target (`jp-peft export gguf`, `jp-peft serve
    --check`), keeping the scores of the run's eval stage where it has run (it deletes an earlier spec's first)."""
    results = rundir.eval_results(spec)
    return write_cards(spec, stage, record, rundir.read_json(results, "model cards") if results.exists() else None)


def write_cards(spec: ExperimentSpec, stage: str, record: ExportRecord,
                results: dict[str, Any] | None = None) -> list[Path]:
    """README.md in each Hugging Face artifact of the stage's export, with `results` (eval/results.json as the
    eval stage just wrote it) as the model-index. The export stage passes none: an eval/results.json there
    may be an earlier spec's. Returns the cards written."""
    from huggingface_hub import ModelCard

    metrics = read_stage_metrics(rundir.metrics_file(spec, stage))
    prepared = rundir.read_json(rundir.data_record(spec), "model card") if rundir.data_record(spec).is_file() else {}
    license_id, license_why = base_license(spec)
    written = []
    for artifact, directory in (("hf_adapter", record.hf_adapter), ("hf_merged", record.hf_merged)):
        if directory is None or not Path(directory).is_dir():
            continue
        data = card_data(spec, stage, record, artifact, metrics, results, license_id)
        body = _body(spec, stage, record, artifact, metrics, results, prepared, license_why, data)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
        path = Path(directory) / CARD
        card.save(path)
        written.append(path)
    return written


# --- the markdown ------------------------------------------------------------------------------

def _body(spec, stage, record, artifact, metrics, results, prepared, license_why, data) -> str:
    adapter = artifact == "hf_adapter"
    path = record.hf_adapter if adapter else record.hf_merged
    what = ("PEFT adapter" if adapter else "merged Hugging Face model") + f" of jp-peft's {stage} stage"
    lines = [f"# {data.model_name}", "",
             f"The {what} ({stage_row(stage).what}) of the run `{spec.name}`, trained with "
             f"{METHOD_WHAT[metrics.method]} from `{data.base_model}`.", "",
             *_limitations(spec, metrics), *_training(spec, stage, metrics), *_data(spec, stage, artifact, prepared),
             *_results(metrics, results, stage), *_load(artifact, path, record),
             *_deployment(record, artifact, path), *_upload(spec, data, path),
             "## License", "", f"`{data.license}`: {license_why}.", ""]
    return "\n".join(lines)


def _limitations(spec: ExperimentSpec, metrics: StageMetrics) -> list[str]:
    if spec.model.tiny:
        from jp_peft.tiny import TINY

        text = (f"This is the embedded tiny test model (a {metrics.total_params:,}-parameter Qwen2 with a "
                f"{TINY['vocab_size']}-token vocabulary, built from about 2 MB of bundled samples): it exists to "
                "exercise the pipeline end to end. **It is not a language model anyone should use**: its text is "
                "not meaningful.")
    else:
        text = ("A 0.5B-parameter model after a short LoRA continual-learning run: it makes factual errors and "
                "its Japanese is only as good as the data it saw. Score it on your own tasks before using it; it "
                "has no safety tuning beyond what the base model had.")
    return ["## Limitations", "", text, ""]


def _training(spec: ExperimentSpec, stage: str, metrics: StageMetrics) -> list[str]:
    train = spec.stage(stage).train
    lora = spec.lora
    method = METHOD_WHAT[metrics.method]
    if metrics.method != "full":
        method += (f": r={lora.rank}, alpha={lora.alpha} (scale {lora.scale:g}), dropout {lora.dropout}, "
                   f"on {', '.join(lora.target_modules)}")
    steps = f"{metrics.steps} of {train.max_steps}"
    if metrics.early_stopped_at_step is not None:
        steps += f" (early stopping: {metrics.stop_reason})"
    rows = [("method", method), ("stage", f"{stage}: {stage_row(stage).what}"),
            ("started from", f"`{metrics.base_model}`"), ("backend", metrics.backend), ("steps", steps),
            ("tokens trained", f"{metrics.consumed_tokens:,} ({spec.stage(stage).data.seq_length}-token sequences, "
                               f"global batch {train.global_batch_size})"),
            ("learning rate", f"{train.lr:g} (cosine to {train.min_lr:g}, {train.warmup_steps} warmup steps)"),
            ("precision", metrics.precision),
            ("trainable parameters", f"{metrics.trainable_params:,} of {metrics.total_params:,} "
                                     f"({metrics.trainable_percent:.2f}%)"),
            ("train loss", f"{metrics.train_loss_first:.4f} -> {metrics.train_loss_last:.4f}")]
    return ["## Training", "", *_table(("", ""), rows), ""]


def _data(spec: ExperimentSpec, stage: str, artifact: str, prepared: dict) -> list[str]:
    stages = [stage] if artifact == "hf_adapter" else lineage(spec, stage)
    rows = []
    for s in stages:
        data = spec.stage(s).data
        if s in trained_with(BLEND):
            weights = data.blend_weights()
            for entry, weight in zip(data.blend, weights):
                tokens = prepared.get(entry.prefix, {}).get("tokens")
                rows.append((s, entry.name, entry.lang, f"{weight:.3f}", ", ".join(f"`{x}`" for x in entry.source)
                             or f"`{entry.prefix}`", f"{tokens:,}" if tokens is not None else "not recorded"))
        elif s in trained_with(PREFERENCE):
            report = prepared.get(str(Path(data.train).parent), {})
            rows.append((s, "preference pairs", "ja", "1", ", ".join(f"`{x}`" for x in data.train_source)
                         or f"`{data.train}`", f"{report['tokens']:,} ({report['kept']:,} pairs)"
                         if "tokens" in report else "not recorded"))
        else:
            root = str(Path(data.sft_train).parent) if data.sft_train else None
            report = prepared.get(root, {})
            rows.append((s, f"chat ({data.sft_format})", "ja", "1", ", ".join(f"`{x}`" for x in data.sft_source)
                         or f"`{data.sft_train}`", f"{report['tokens']:,} ({report['kept']:,} records)"
                         if "tokens" in report else "not recorded"))
    return ["### Data", "", *_table(("stage", "dataset", "lang", "weight", "source", "prepared tokens"), rows), ""]


def _results(metrics: StageMetrics, results: dict[str, Any] | None, stage: str) -> list[str]:
    gain = relative_gain(metrics.base_val_ppl_ja, metrics.val_ppl_ja)
    forgetting = relative_forgetting(metrics.base_val_ppl_en, metrics.val_ppl_en)
    rows = [("Japanese held-out perplexity", f"{metrics.base_val_ppl_ja:.2f} -> {metrics.val_ppl_ja:.2f} "
                                             f"(JA gain {gain:+.2f}%)"),
            ("English held-out perplexity", f"{metrics.base_val_ppl_en:.2f} -> {metrics.val_ppl_en:.2f} "
                                            f"(EN forgetting {forgetting:+.2f}%)")]
    if "reward_accuracy_after" in metrics.extra:  # a preference stage (dpo): its validation pairs
        rows.append(("reward accuracy on the validation pairs", f"{metrics.extra['reward_accuracy_before']:.3f} -> "
                     f"{metrics.extra['reward_accuracy_after']:.3f} (margin {metrics.extra['reward_margin_before']:+.4f}"
                     f" -> {metrics.extra['reward_margin_after']:+.4f})"))
    lines = ["## Results", "", "Against the model the stage started from (held-out text, token-mean cross-entropy):",
             "", *_table(("", ""), rows), ""]
    if results is None or stage not in results.get("models", {}):
        return lines + ["No downstream scores yet: the eval stage writes them (eval/results.json) and this card.", ""]
    from jp_peft.evaluation.summary import BASE, downstream_summary

    summary = downstream_summary(results)
    mine, base = summary["models"][stage], summary["models"].get(BASE, {})

    def cell(value, signed=False):
        return "" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")

    tasks = summary["tasks_ja"] + summary["tasks_en"]
    rows = [(t, "ja" if t in summary["tasks_ja"] else "en", cell(base.get("scores", {}).get(t)),
             cell(mine["scores"][t])) for t in tasks]
    rows += [("JA average", "", cell(base.get("ja_avg")), f"{cell(mine['ja_avg'])} (JA gain {cell(mine['ja_gain'], True)})"),
             ("EN average", "", cell(base.get("en_avg")),
              f"{cell(mine['en_avg'])} (EN forgetting {cell(mine['en_forgetting'], True)})")]
    limit = results.get("eval", {}).get("limit")
    return lines + ["Downstream tasks (lm-evaluation-harness, points = accuracy x 100"
                    + (f", first {limit} items of each task" if limit else "") + "; base = the run's base model):",
                    "", *_table(("task", "lang", "base", "this model"), rows), ""]


def _load(artifact: str, path: str, record: ExportRecord) -> list[str]:
    if artifact == "hf_adapter":
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"base = AutoModelForCausalLM.from_pretrained({json.dumps(record.adapter_base)})",
                f"model = PeftModel.from_pretrained(base, {json.dumps(path)})",
                f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(record.adapter_base)})"]
    else:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model = AutoModelForCausalLM.from_pretrained({json.dumps(path)})",
                f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(path)})"]
    code += ['ids = tokenizer("日本の首都は", return_tensors="pt").input_ids',
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))"]
    return ["## How to load it", "", "```python", *code, "```", ""]


def _deployment(record: ExportRecord, artifact: str, path: str) -> list[str]:
    entries = record.deployability.get(artifact, [])
    rows = []
    for e in entries:
        if e["status"] == deploy.VERIFIED:
            detail = "; ".join(deploy.check_detail(c) for c in e["checks"])
        elif e["status"] == deploy.REFUSED:
            detail = e["reason"]
        else:
            detail = "; ".join(x for x in (f"`{e['command']}`" if "command" in e else "", e.get("note", "")) if x)
        rows.append((e["target"], e["status"], detail))
    lines = ["## Deployment", "",
             "Verified means jp-peft ran that target on this artifact and checked it against the trained model "
             "(the export; llama.cpp: `jp-peft export gguf`; vLLM: `jp-peft serve --check`); not verified here: "
             "not run by jp-peft for this artifact yet.", "", *_table(("target", "status", "detail"), rows), ""]
    vllm = next((e for e in entries if e["target"] == deploy.VLLM), None)
    if artifact == "hf_adapter" and vllm is not None and vllm["status"] == deploy.REFUSED:
        merged = record.hf_merged
        lines += [f"vLLM and llama.cpp refuse this adapter ({vllm['reason']}). Serve the merged model instead:", "",
                  "```bash", f"vllm serve {merged}", "```", ""]
    elif vllm is not None and "command" in vllm:
        lines += ["With vLLM (not verified here):", "", "```bash", vllm["command"], "```", ""]
    return lines


def _upload(spec: ExperimentSpec, data, path: str) -> list[str]:
    lines = ["## Upload", "", "jp-peft uploads nothing; with the `hf` command of huggingface_hub:", "", "```bash",
             f"hf upload REPO_ID {path}", "```", ""]
    if spec.model.tiny:
        return lines + ["The tiny base is not on the Hub: an upload of this artifact is a test artifact only.", ""]
    if Path(data.base_model).is_absolute():
        lines += [f"`base_model` above is the local directory the run trained from (`{data.base_model}`): set it "
                  "to the base's Hub id (e.g. `Qwen/Qwen2.5-0.5B`) before uploading, so that the Hub links the two"
                  + (" (and `base_model_name_or_path` in adapter_config.json, so that the adapter loads from the "
                     "Hub)" if data.library_name == "peft" else "") + ".", ""]
    return lines


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    def esc(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(esc(c) for c in row)} |" for row in rows)]
