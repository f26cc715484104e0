"""The top-level help of ``lightning-safety``, written out so that it prints without importing torch.

``lightning-safety``, ``lightning-safety -h`` and ``lightning-safety --help`` print :func:`top_level_help`
at once; ``lightning-safety <command> --help`` gives each command's options. A test keeps
:data:`SUBCOMMANDS` equal to the real commands (LightningCLI's and :data:`lightning_safety.commands.COMMANDS`,
with the first line of each command's docstring).
"""

from __future__ import annotations

PROG = "lightning-safety"
DESCRIPTION = "Fine-tune chat LLMs while keeping them safe (adaptive KL)."

LIGHTNING_SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("fit", "Fine-tune a model (SafeFineTuning) on chat data from a YAML recipe (--config)."),
    ("validate", "Run one evaluation epoch over the validation set."),
    ("test", "Run one evaluation epoch over the test set."),
    ("predict", "Per-example risk, beta, NLL and KL to the reference over the data (an audit)."),
)
"""LightningCLI's subcommands, with their one-line summaries."""

SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("probe fit", "Train an activation probe on harmful vs benign prompts and save it (safetensors + JSON)."),
    ("probe sweep", "Probe quality for every layer and pooling: a markdown table, JSON and a PNG plot."),
    ("judge fit", "Train an EmbeddingJudge head on harmful vs benign prompts and save it (for --judge.head)."),
    ("score", "Score a dataset or a prompt list once with a judge, a probe, the reference's refusal probability, "
              "or several; write each row's risk."),
    ("evaluate", "Evaluate a model's safety and utility; write metrics.json, summary.md, samples and plots."),
    ("demo", "Align a small model, attack it by fine-tuning, defend it with adaptive KL; print a table."),
    ("anchors", "Write the safe reference's refusals to harmful requests as a JSONL of refusal anchors (for "
                "data.anchors)."),
    ("export", "Export a SafeFineTuning checkpoint for inference: a Hugging Face folder, or a PEFT adapter."),
    ("precompute-reference", "Run the frozen reference once over a recipe's data; cache its top-k log-probs (for "
                             "--model.reference_cache)."),
)
"""The commands of :mod:`lightning_safety.commands`, with the first line of their docstrings."""

HELP_FLAGS = ("-h", "--help")


def wants_top_level_help(argv: list[str]) -> bool:
    """True for no arguments, ``-h`` or ``--help`` alone."""
    return not argv or (len(argv) == 1 and argv[0] in HELP_FLAGS)


def top_level_help() -> str:
    """Usage, every subcommand with its one-line summary, and where to read more."""
    width = max(len(name) for name, _ in LIGHTNING_SUBCOMMANDS + SUBCOMMANDS) + 2
    lines = [
        f"usage: {PROG} <command> [options]", "", DESCRIPTION, "",
        "Training (LightningCLI; a YAML recipe with --config, e.g. configs/tiny.yaml):",
    ]
    lines += [f"  {name:<{width}}{summary}" for name, summary in LIGHTNING_SUBCOMMANDS]
    lines += ["", "Safety:"]
    lines += [f"  {name:<{width}}{summary}" for name, summary in SUBCOMMANDS]
    lines += [
        "", "options:", f"  {'-h, --help':<{width}}Show this help message and exit.", "",
        f"Run `{PROG} <command> --help` for a command's options, e.g. `{PROG} fit --help`.",
    ]
    return "\n".join(lines) + "\n"
