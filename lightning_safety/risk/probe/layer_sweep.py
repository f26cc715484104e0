"""The layer / pooling sweep: a logistic probe for every (layer, pooling) from one featurization,
its metrics in and out of distribution, as rows, a markdown table and a PNG plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.errors import ProbeError
from lightning_safety.risk.hooks import resolve_layer_indices
from lightning_safety.risk.metrics_core import auroc, recall_at_fpr
from lightning_safety.risk.probe.artifact import model_structure
from lightning_safety.risk.probe.features import combine_layers, featurize_pooled
from lightning_safety.risk.probe.training import TRAINING_DEFAULTS, ranking_scores, stratified_split, train_probe


def sweep(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    layers: str | Sequence[int] = "all",
    poolings: Sequence[str] = ("last", "mean"),
    include_mean_all_layers: bool = True,
    ood: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    val_fraction: float = TRAINING_DEFAULTS.val_fraction,
    seed: int = TRAINING_DEFAULTS.seed,
    epochs: int = TRAINING_DEFAULTS.epochs,
    lr: float = TRAINING_DEFAULTS.lr,
    weight_decay: float = TRAINING_DEFAULTS.weight_decay,
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Logistic probes for every (layer, pooling), plus ``mean_all_layers``, from one featurization.

    Each prompt set is run once, capturing every swept layer per forward. Every probe uses the
    same seeded stratified validation split.

    Args:
        layers: ``"all"`` or decoder layer indices.
        poolings: per-layer poolings, among ``"last"`` and ``"mean"``.
        ood: name -> (harmful prompts, benign prompts) scored by every probe (AUROC only).

    Returns:
        One row per probe: ``layer`` (int, or None for mean_all_layers), ``pooling``,
        ``val_auroc``, ``train_auroc``, ``recall_at_1pct_fpr``, ``recall_at_5pct_fpr`` (validation
        split) and ``ood_auroc`` (name -> AUROC).
    """
    for pooling in poolings:
        if pooling not in ("last", "mean"):
            raise ProbeError(f"sweep pooling '{pooling}' is not per-layer: use 'last' and/or 'mean'")
    num_layers, _ = model_structure(model)
    if isinstance(layers, str):
        if layers != "all":
            raise ProbeError(f"layers='{layers}' is not understood: pass 'all' or a list of layer indices")
        layers = list(range(num_layers))
    resolved = resolve_layer_indices(layers, num_layers)
    hows = tuple(dict.fromkeys([*poolings, *(["mean"] if include_mean_all_layers else [])]))

    def featurize(prompts: Sequence[str]) -> dict[int, dict[str, Tensor]]:
        return featurize_pooled(
            model, tokenizer, prompts, layers=resolved, hows=hows,
            batch_size=batch_size, system_prompt=system_prompt, progress=progress,
        )

    def with_labels(harm: Sequence[str], ben: Sequence[str]) -> tuple[dict[int, dict[str, Tensor]], Tensor]:
        labels = torch.cat([torch.ones(len(harm)), torch.zeros(len(ben))])
        return featurize(list(harm) + list(ben)), labels

    main, labels = with_labels(harmful, benign)
    ood_sets = {name: with_labels(harm, ben) for name, (harm, ben) in (ood or {}).items()}
    _, val_idx = stratified_split(labels, val_fraction, seed)

    configs: list[tuple[int | None, str, list[int]]] = [(layer, p, [layer]) for layer in resolved for p in poolings]
    if include_mean_all_layers:
        configs.append((None, "mean_all_layers", resolved))
    rows = []
    for layer, pooling, used in configs:
        features = combine_layers(main, used, pooling)
        classifier, metrics = train_probe(
            features, labels, kind="logistic", weight_decay=weight_decay,
            lr=lr, epochs=epochs, val_fraction=val_fraction, seed=seed,
        )
        val_scores = ranking_scores(classifier, features[val_idx])
        row = {
            "layer": layer,
            "pooling": pooling,
            "val_auroc": metrics["val_auroc"],
            "train_auroc": metrics["train_auroc"],
            "recall_at_1pct_fpr": recall_at_fpr(val_scores, labels[val_idx], 0.01) if val_idx.numel() else None,
            "recall_at_5pct_fpr": recall_at_fpr(val_scores, labels[val_idx], 0.05) if val_idx.numel() else None,
            "ood_auroc": {
                name: auroc(ranking_scores(classifier, combine_layers(pooled, used, pooling)), ood_labels)
                for name, (pooled, ood_labels) in ood_sets.items()
            },
        }
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`sweep` rows (one column per OOD set)."""
    ood_names = list(dict.fromkeys(name for row in rows for name in row.get("ood_auroc", {})))
    header = ["layer", "pooling", "val AUROC", "recall@1%FPR", "recall@5%FPR", *[f"AUROC {n}" for n in ood_names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            "all" if row["layer"] is None else str(row["layer"]),
            row["pooling"],
            _cell(row.get("val_auroc")),
            _cell(row.get("recall_at_1pct_fpr")),
            _cell(row.get("recall_at_5pct_fpr")),
            *[_cell(row.get("ood_auroc", {}).get(name)) for name in ood_names],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """PNG of validation AUROC vs layer, one line per pooling (OOD AUROC dashed); mean_all_layers as a level line."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend switch, no display needed
    except ImportError as error:
        raise ProbeError("plotting the sweep needs matplotlib: pip install 'lightning-safety[plots]'") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    ood_names = list(dict.fromkeys(name for row in rows for name in row.get("ood_auroc", {})))
    for pooling in dict.fromkeys(row["pooling"] for row in rows if row["layer"] is not None):
        subset = sorted((row for row in rows if row["pooling"] == pooling and row["layer"] is not None), key=lambda r: r["layer"])
        line = axes.plot([r["layer"] for r in subset], [r["val_auroc"] for r in subset], marker="o", label=f"{pooling} (val)")
        for name in ood_names:
            axes.plot(
                [r["layer"] for r in subset], [r["ood_auroc"].get(name) for r in subset],
                linestyle="--", color=line[0].get_color(), alpha=0.7, label=f"{pooling} ({name})",
            )
    for row in rows:
        if row["layer"] is None and row.get("val_auroc") is not None:
            axes.axhline(row["val_auroc"], color="gray", linestyle=":", label=f"{row['pooling']} (val)")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("AUROC")
    axes.set_title("Activation probe: harmful vs benign prompts")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)  # a Figure without pyplot renders PNG with the Agg canvas
    return path


__all__ = ["plot_sweep", "sweep", "sweep_table"]
