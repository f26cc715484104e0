"""Crash safety: real processes killed with SIGKILL at chosen points, then their files checked.

Each kill point starts the real program (a CLI fit, export or evaluate; a Python process building
an aligned model) through ``tests/kill_points.py``, which SIGKILLs it at the N-th call of a named
function: in the middle of a write (the file the call wrote is cut to half, as a crash during the
write leaves it), just before a rename that publishes a file, or after an optimizer step. After
the kill: the final path is absent or holds the previous complete version, its loader loads that
or refuses in one line, leftovers are hidden and ignored (or removed by the next run), a resume
from the last complete checkpoint ends with the uninterrupted run's weights, and the audit log
keeps every row completed before the kill.

Kill points (10): an optimizer step; a ``step=N.ckpt`` write; a ``last.ckpt`` write; the
``last.ckpt`` relink (``save_last="link"``); an audit-log write; a risk-cache replace; an export's
weights; a report overwrite's ``metrics.json``; a report overwrite between its two renames; an
aligned-model cache build's weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_safety.callbacks.audit import read_audit_log
from lightning_safety.checkpointing import AtomicCheckpointIO, AtomicCheckpoints, remove_stale_partials
from lightning_safety.errors import LightningSafetyError, ModelLoadError
from lightning_safety.evaluation.loading import read_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc/self/fd are Linux's")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
KILL_POINTS = TESTS / "kill_points.py"
DATA = REPO_ROOT / "configs" / "data"
MAX_STEPS = 6  # 18 training rows in batches of 4: an epoch is 5 steps, so step 6 is in the second epoch
# Batches 0 and 1 hold 8 audit rows: those a kill during the third batch must keep.
ROWS_BEFORE_STEP_2 = 8


def python(*program: str, kill: tuple[Any, ...] | None = None, exit_code: int = 0) -> subprocess.CompletedProcess:
    """Run ``python *program`` from the repository root; under ``kill``, require the SIGKILL to happen."""
    command = [sys.executable, *([str(KILL_POINTS), *map(str, kill), "--"] if kill else []), *program]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS)]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if kill:
        assert result.returncode == -signal.SIGKILL and "kill point reached" in result.stderr, (
            f"kill point {kill} not reached (exit code {result.returncode}): {result.stderr[-3000:]}"
        )
    else:
        assert result.returncode == exit_code, result.stderr[-3000:]
    return result


def fit(root: Path, *extra: str, save_last: str = "true") -> list[str]:
    """The tiny recipe with a checkpoint every step, the audit log, a risk cache and atomic checkpoints."""
    return [
        "-m", "lightning_safety.cli", "fit", "--config", "configs/tiny.yaml",
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(MAX_STEPS),
        "--trainer.enable_checkpointing", "true",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpts'}",
        "--trainer.callbacks.filename={step}", "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.save_last={save_last}",
        "--trainer.callbacks+=lightning_safety.callbacks.RiskAuditLog", f"--trainer.callbacks.path={root / 'audit.jsonl'}",
        "--trainer.callbacks+=lightning_safety.callbacks.RiskCallback",
        "--trainer.callbacks.estimator=id_hash_risk.IdHashRisk", f"--trainer.callbacks.cache_path={root / 'risk.json'}",
        "--trainer.callbacks+=lightning_safety.checkpointing.AtomicCheckpoints",
        *extra,
    ]  # fmt: skip


def checkpoints(root: Path) -> dict[str, int]:
    """Every ``*.ckpt`` in the run's folder with its step; each must load (a torn file would raise)."""
    return {
        path.name: torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        for path in sorted((root / "ckpts").glob("*.ckpt"))
    }


def audit_rows(root: Path) -> list[dict[str, Any]]:
    """The audit log's rows, failing on any warning (no torn line expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_audit_log(root / "audit.jsonl")


def deduplicated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by (rank, step, batch_idx, id), the last one kept: what a resume's replayed steps wrote again."""
    return list({(row["rank"], row["step"], row["batch_idx"], row["id"]): row for row in rows}.values())


def assert_resumed_like(root: Path, clean: Path) -> None:
    """The resumed run ended where the uninterrupted one did: same weights, same audit rows."""
    final = torch.load(root / "ckpts" / f"step={MAX_STEPS}.ckpt", map_location="cpu", weights_only=True)
    expected = torch.load(clean / "ckpts" / f"step={MAX_STEPS}.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == MAX_STEPS and final["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=0, atol=0, msg=f"{name} differs after resume")
    assert deduplicated(audit_rows(root)) == audit_rows(clean)
    assert not list((root / "ckpts").glob(".*"))  # the dead run's temporary files are gone


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """An uninterrupted run: what every killed and resumed run must end with."""
    root = tmp_path_factory.mktemp("clean")
    python(*fit(root))
    assert checkpoints(root)["last.ckpt"] == MAX_STEPS
    return root


# ------------------------------------------------------------------------------------------ training
def test_a_kill_after_an_optimizer_step_resumes_from_the_last_checkpoint(clean: Path, tmp_path: Path) -> None:
    python(*fit(tmp_path), kill=("torch.optim:AdamW.step", "after", 3))  # step 3 taken, not yet checkpointed
    assert checkpoints(tmp_path) == {"last.ckpt": 2, "step=1.ckpt": 1, "step=2.ckpt": 2}
    rows = audit_rows(tmp_path)
    assert rows == audit_rows(clean)[:ROWS_BEFORE_STEP_2]  # every row of the two completed batches
    python(*fit(tmp_path, "--ckpt_path", "last"))
    assert audit_rows(tmp_path)[: len(rows)] == rows
    assert_resumed_like(tmp_path, clean)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    "call, torn, resume",
    [(5, "step=3.ckpt", "ckpts/step=2.ckpt"), (6, "last.ckpt", "last")],
    ids=["step-checkpoint", "last-checkpoint"],
)
def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_file(
    clean: Path, tmp_path: Path, call: int, torn: str, resume: str
) -> None:
    # torch.save calls: step=1.ckpt, last.ckpt, step=2.ckpt, last.ckpt, step=3.ckpt (5), last.ckpt (6)
    python(*fit(tmp_path), kill=("torch:save", "torn", call))
    expected = {"last.ckpt": 2, "step=1.ckpt": 1, "step=2.ckpt": 2}
    if torn == "last.ckpt":
        expected["step=3.ckpt"] = 3
    assert checkpoints(tmp_path) == expected  # last.ckpt is still step 2's, complete
    # The torn bytes are in a hidden temporary file no checkpoint pattern matches.
    (partial,) = (tmp_path / "ckpts").glob(f".{torn}.*.partial")
    # Under a checkpoint's name (as another writer might have left them) the loader refuses them in one line.
    damaged = tmp_path / "damaged.ckpt"
    shutil.copy(partial, damaged)
    with pytest.raises(ModelLoadError, match="damaged or incomplete") as error:
        AtomicCheckpointIO().load_checkpoint(damaged)  # a resume
    assert "\n" not in str(error.value)
    with pytest.raises(LightningSafetyError) as error:
        read_checkpoint(damaged)  # export and evaluate
    assert "\n" not in str(error.value)
    path = str(tmp_path / resume) if resume != "last" else resume
    python(*fit(tmp_path, "--ckpt_path", path))
    assert_resumed_like(tmp_path, clean)


def test_a_kill_while_last_ckpt_is_relinked_keeps_the_old_link(clean: Path, tmp_path: Path) -> None:
    # Lightning deletes last.ckpt and then links it again: a kill in between left no last.ckpt.
    python(*fit(tmp_path, save_last="link"), kill=("os:symlink", "before", 2))
    link = tmp_path / "ckpts" / "last.ckpt"
    assert link.is_symlink() and os.readlink(link) == "step=1.ckpt"
    assert checkpoints(tmp_path) == {"last.ckpt": 1, "step=1.ckpt": 1, "step=2.ckpt": 2}
    python(*fit(tmp_path, "--ckpt_path", "last", save_last="link"))
    # Lightning's own version counter may name the new link last-v1.ckpt; "last" takes the newest.
    newest = max(link.parent.glob("last*.ckpt"), key=lambda path: path.lstat().st_mtime_ns)
    assert os.readlink(newest) == f"step={MAX_STEPS}.ckpt"
    assert_resumed_like(tmp_path, clean)


def test_a_resume_from_a_torn_last_checkpoint_is_refused_in_one_line(clean: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(clean / "ckpts" / "step=1.ckpt", folder / "step=1.ckpt")
    data = (clean / "ckpts" / "step=2.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # what an in-place writer leaves
    result = python(*fit(tmp_path, "--ckpt_path", "last"), exit_code=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "damaged or incomplete" in errors[0] and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ audit log
def test_a_kill_in_the_middle_of_an_audit_write_keeps_every_completed_row(clean: Path, tmp_path: Path) -> None:
    python(*fit(tmp_path), kill=("os:write", "torn", 3, "audit.jsonl"))  # the third batch's rows, half written
    log = tmp_path / "audit.jsonl"
    assert not log.read_bytes().endswith(b"\n")
    with pytest.warns(UserWarning, match="skipped an incomplete last line"):
        rows = read_audit_log(log)
    assert ROWS_BEFORE_STEP_2 <= len(rows) < ROWS_BEFORE_STEP_2 + 4
    assert rows == audit_rows(clean)[: len(rows)]
    assert checkpoints(tmp_path)["last.ckpt"] == 2  # the kill came before step 3's checkpoint
    resumed = python(*fit(tmp_path, "--ckpt_path", "last"))
    assert "removed an incomplete last line" in resumed.stderr
    assert log.read_bytes().endswith(b"\n")
    assert audit_rows(tmp_path)[: len(rows)] == rows
    assert_resumed_like(tmp_path, clean)


# ------------------------------------------------------------------------------------------ risk cache
def test_a_kill_while_the_risk_cache_is_replaced_keeps_the_previous_cache(clean: Path, tmp_path: Path) -> None:
    from lightning_safety.risk.cache import RiskCache

    # Saves: at the end of epoch 1, then at teardown (2): its temporary file is cut to half before the rename.
    python(*fit(tmp_path), kill=("os:replace", "cut", 2, "*risk.json*"))
    assert (tmp_path / "risk.json").read_bytes() == (clean / "risk.json").read_bytes()
    loaded = RiskCache("id-hash", tmp_path / "risk.json").state_dict()
    assert loaded == RiskCache("id-hash", clean / "risk.json").state_dict() and loaded["scores"]
    (leftover,) = tmp_path.glob(".risk.json.*")  # the torn temporary file: hidden, never read
    assert leftover.stat().st_size < (clean / "risk.json").stat().st_size


# ------------------------------------------------------------------------------------------ export
def test_a_kill_while_exporting_leaves_no_output_folder(clean: Path, tmp_path: Path) -> None:
    from lightning_safety.commands import export
    from lightning_safety.models import load_causal_lm

    checkpoint, output = str(clean / "ckpts" / f"step={MAX_STEPS}.ckpt"), tmp_path / "exported"
    python("-m", "lightning_safety.cli", "export", "--checkpoint", checkpoint, "--output", str(output),
           kill=("safetensors.torch:save_file", "torn", 1, "model.safetensors"))  # fmt: skip
    assert not output.exists()
    (leftover,) = tmp_path.glob(".exported.*")
    assert (leftover / "model.safetensors").is_file()  # the torn weights, hidden
    with pytest.raises(ModelLoadError, match="not found") as error:
        load_causal_lm(str(output))
    assert "\n" not in str(error.value)
    export(checkpoint, str(output))  # the leftover neither blocks nor feeds the next export
    assert load_causal_lm(str(output)).config.num_hidden_layers > 0


# ------------------------------------------------------------------------------------------ reports
def test_a_kill_while_a_report_is_overwritten_keeps_the_old_report_or_says_where_it_is(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from lightning_safety.cli import run_cli
    from lightning_safety.evaluation.report import ReportError, load_report

    output = tmp_path / "rep"
    args = ["evaluate", "--model", str(tiny_model_dir), "--output", str(output),
            "--harmful.path", str(DATA / "eval_harmful.jsonl"), "--max_new_tokens", "4", "--batch_size", "8",
            "--progress", "false", "--plots", "false", "--overwrite", "true"]  # fmt: skip
    run_cli(args)
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    # Killed while the new report's metrics.json is half written: the old report is untouched.
    python("-m", "lightning_safety.cli", *args, kill=("pathlib:Path.write_text", "torn", 1, "metrics.json"))
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert load_report(output)["results"]

    # Killed between the two renames (old report set aside, new one not yet in place): no half report,
    # and the loader says where the old one is.
    python("-m", "lightning_safety.cli", *args, kill=("os:rename", "after", 1, "report"))
    assert not output.exists()
    with pytest.raises(ReportError, match="interrupted overwrite left the previous report in") as error:
        load_report(output)
    kept = Path(str(error.value).rsplit(" in ", 1)[1].rstrip(")"))
    assert {path.name: path.read_bytes() for path in kept.iterdir()} == before

    run_cli(args)  # the next run writes a complete report; the hidden leftovers are never read
    assert load_report(output)["results"] and (output / "summary.md").is_file()


# ------------------------------------------------------------------------------------------ aligned model
ALIGN_HARMFUL = ["How do I build a bomb?", "Help me rob a bank."]
ALIGN_BENIGN = ["Name three fruits.", "What is rain?"]
ALIGN = f"""
import sys
from lightning_safety.experiments.alignment import AlignmentSettings, build_aligned_reference
from lightning_safety.models import LoraSettings

settings = AlignmentSettings(refusal_texts=("I cannot help.",), epochs=1, lr=1e-2, max_length=64, batch_size=4,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_new_tokens_benign=4)
print(build_aligned_reference(sys.argv[1], {ALIGN_HARMFUL!r}, {ALIGN_BENIGN!r}, settings, cache_dir=sys.argv[2]))
"""


def test_a_kill_while_the_aligned_model_is_cached_leaves_no_cache_entry(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lightning_safety.models import load_causal_lm

    cache = tmp_path / "aligned"
    python("-c", ALIGN, str(tiny_model_dir), str(cache),
           kill=("safetensors.torch:save_file", "torn", 1, "model.safetensors"))  # fmt: skip
    assert [path.name.startswith(".") for path in cache.iterdir()] == [True]  # only the hidden, torn folder
    built = Path(python("-c", ALIGN, str(tiny_model_dir), str(cache)).stdout.strip().splitlines()[-1])
    assert built.parent == cache and not built.name.startswith(".") and (built / "alignment.json").is_file()
    assert load_causal_lm(str(built)).config.num_hidden_layers > 0


# ------------------------------------------------------------------------------------------ the plugin itself
def test_atomic_checkpoint_io_round_trips_with_a_plain_files_mode_and_no_leftovers(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "nested" / "model.ckpt"
    io.save_checkpoint({"global_step": 1, "weight": torch.arange(4)}, path)
    io.save_checkpoint({"global_step": 2, "weight": torch.arange(5)}, path)  # replaces the file
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 2 and torch.equal(loaded["weight"], torch.arange(5))
    assert os.listdir(path.parent) == ["model.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_complete_checkpoint_that_fails_to_load_keeps_its_own_error(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"thing": L.Callback()}, path)  # complete, but not loadable with weights_only
    with pytest.raises(Exception) as error:
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    assert not isinstance(error.value, LightningSafetyError)


def test_only_temporary_files_of_dead_processes_on_this_host_are_removed(tmp_path: Path) -> None:
    from lightning_safety.checkpointing import _host

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    names = {
        "dead": f".last.ckpt.{_host()}.{dead}.abc123.partial",
        "alive": f".last.ckpt.{_host()}.{os.getpid()}.abc123.partial",
        "other host": f".last.ckpt.elsewhere.{dead}.abc123.partial",
        "checkpoint": "step=1.ckpt",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_partials(tmp_path) == [tmp_path / names["dead"]]
    assert sorted(os.listdir(tmp_path)) == sorted(n for key, n in names.items() if key != "dead")


def test_the_callback_installs_the_plugin_only_over_lightnings_default(tmp_path: Path) -> None:
    class Custom(TorchCheckpointIO):
        pass

    default = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    AtomicCheckpoints().setup(default, L.LightningModule(), "fit")
    assert type(default.strategy.checkpoint_io) is AtomicCheckpointIO
    custom = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, plugins=[Custom()])
    AtomicCheckpoints().setup(custom, L.LightningModule(), "fit")
    assert type(custom.strategy.checkpoint_io) is Custom
