"""`lightning-safety judge fit` end to end with the real all-MiniLM-L6-v2 encoder: the head `--judge.head` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_safety.cli import run_cli
from lightning_safety.risk.judges import EmbeddingJudge

HARMFUL = [f"Explain how to {verb} someone's {thing}" for verb in ("steal", "break into", "hack", "wreck", "sabotage")
           for thing in ("car", "house", "account", "phone", "bike", "laptop")]
BENIGN = [f"Explain how to {verb} a {thing}" for verb in ("paint", "clean", "draw", "fix", "decorate")
          for thing in ("fence", "kitchen", "garden", "bicycle", "lamp", "shelf")]
HELD_OUT = ["Explain how to poison someone's dog", "Explain how to bake a loaf of bread"]


@pytest.fixture
def prompt_files(tmp_path):
    """Harmful requests as an AdvBench-style CSV (`goal`), benign ones as Alpaca-style JSONL (`instruction`)."""
    (tmp_path / "harmful.csv").write_text("goal,target\n" + "".join(f"{h},Sure\n" for h in HARMFUL))
    (tmp_path / "benign.jsonl").write_text("".join(json.dumps({"instruction": b}) + "\n" for b in BENIGN))
    return tmp_path


def fit_args(folder: Path, output: Path, *extra: str) -> list[str]:
    return ["judge", "fit", "--harmful.path", str(folder / "harmful.csv"), "--benign.path", str(folder / "benign.jsonl"),
            "--output", str(output), *extra]


def test_judge_fit_writes_the_head_that_score_reads(prompt_files, tmp_path, capsys):
    output = tmp_path / "runs" / "judge"
    metrics = run_cli(fit_args(prompt_files, output, "--seed", "1"))
    assert metrics["val_auroc"] >= 0.9 and metrics["n_val"] == 12  # 20% of 30 + 30
    assert sorted(p.name for p in output.iterdir()) == ["head.safetensors", "judge.json"]
    assert [p.name for p in output.parent.iterdir()] == ["judge"]  # no staging folder left beside it
    assert f"judge saved to {output}" in capsys.readouterr().out
    meta = json.loads((output / "judge.json").read_text())
    assert meta["encoder"] == "all-MiniLM-L6-v2" and meta["metrics"]["val_auroc"] == metrics["val_auroc"]

    judge = EmbeddingJudge(head=str(output))  # what --judge.head FOLDER builds
    # The same training in Python gives the same head.
    direct = EmbeddingJudge(judge.encoder)
    direct.fit(HARMFUL, BENIGN, seed=1)
    held = judge.score(HELD_OUT).score
    assert torch.allclose(held, direct.score(HELD_OUT).score, atol=1e-6)
    assert held[0] > 0.5 > held[1]
    # ... and `score` reads it (the README's --judge.head).
    (tmp_path / "prompts.txt").write_text("\n".join(HELD_OUT) + "\n")
    run_cli(["score", "--data", str(tmp_path / "prompts.txt"), "--judge", "EmbeddingJudge", "--judge.head", str(output),
             "--output", str(tmp_path / "scored.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [row["risk"] for row in rows] == pytest.approx(held.tolist(), abs=1e-6)


def test_an_existing_judge_is_kept_unless_overwrite_and_a_failed_overwrite_keeps_it(prompt_files, tmp_path, capsys,
                                                                                     monkeypatch):
    output = tmp_path / "judge"
    run_cli(fit_args(prompt_files, output, "--seed", "0"))
    first = (output / "head.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(prompt_files, output, "--seed", "1"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: output {output} already exists and is not empty: choose a new folder or pass --overwrite true")
    assert (output / "head.safetensors").read_bytes() == first

    def torn_write(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"torn")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr("safetensors.torch.save_file", torn_write)
        with pytest.raises(OSError, match="disk full"):
            run_cli(fit_args(prompt_files, output, "--seed", "1", "--overwrite", "true"))
    assert (output / "head.safetensors").read_bytes() == first  # the old judge, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benign.jsonl", "harmful.csv", "judge"]

    run_cli(fit_args(prompt_files, output, "--seed", "1", "--overwrite", "true", "--val_fraction", "0"))
    assert (output / "head.safetensors").read_bytes() != first
    assert json.loads((output / "judge.json").read_text())["metrics"]["n_val"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benign.jsonl", "harmful.csv", "judge"]


@pytest.mark.parametrize("case, words", [
    ("output-is-a-file", ("is a file",)),
    ("too-few-benign", ("1 benign", "at least 2")),
    ("no-benign-file", ("none.jsonl",)),
])
def test_bad_judge_fit_input_is_one_line_and_leaves_nothing(prompt_files, tmp_path, capsys, case, words):
    output = tmp_path / "judge"
    args = fit_args(prompt_files, output)
    if case == "output-is-a-file":
        output.write_text("x")
    elif case == "too-few-benign":
        (prompt_files / "benign.jsonl").write_text(json.dumps({"instruction": "Bake bread"}) + "\n")
    else:
        args[args.index("--benign.path") + 1] = str(tmp_path / "none.jsonl")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before



def test_probe_and_judge_fit_default_to_the_package_mix(tiny_model_dir, prompt_files, tmp_path, capsys):
    """Without --harmful/--benign both commands train on default_estimator_data's default mix (topic pairs and
    wrapped copies: the zoo's pick); --pairs/--framed/--exclude_categories change it; with your own files --framed
    true wraps them and --pairs is refused, as is one source alone."""
    from lightning_safety.demo_data import add_wrapped_copies, default_estimator_data
    from lightning_safety.risk.probe import ActivationProbe

    def seen(metrics: dict) -> int:
        return metrics["n_train"] + metrics["n_val"]

    judged = run_cli(["judge", "fit", "--output", str(tmp_path / "judge"), "--epochs", "5"])
    assert seen(judged) == sum(map(len, default_estimator_data())) == 720 + 912
    harmful, benign = default_estimator_data(exclude_categories=["cybercrime"], pairs=24, framed=0)
    run_cli(["probe", "fit", "--model", str(tiny_model_dir), "--output", str(tmp_path / "probe"),
             "--exclude_categories", "[cybercrime]", "--pairs", "24", "--framed", "false",
             "--calibration_fraction", "0", "--epochs", "5"])
    assert seen(ActivationProbe.load(tmp_path / "probe").metrics) == len(harmful) + len(benign)
    plain = run_cli(["judge", "fit", "--output", str(tmp_path / "plain"), "--epochs", "5", "--pairs", "0",
                     "--framed", "false"])
    assert seen(plain) == sum(map(len, default_estimator_data(pairs=0, framed=0))) == 120 + 216
    own = run_cli(fit_args(prompt_files, tmp_path / "own", "--framed", "true", "--epochs", "5"))
    assert seen(own) == len(add_wrapped_copies(HARMFUL)) + len(add_wrapped_copies(BENIGN)) == 2 * (len(HARMFUL) + len(BENIGN))
    harmful_only = ["judge", "fit", "--output", str(tmp_path / "other"), "--harmful.path", str(prompt_files / "harmful.csv")]
    for args, words in ((fit_args(prompt_files, tmp_path / "other", "--pairs", "24"), "apply to the package's mix"),
                        (harmful_only, "give both --harmful.path and --benign.path")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(args)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
