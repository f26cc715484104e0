"""The bad-input catalogue: every case is refused with one line that names the problem, and leaves nothing.

Each case builds its bad input in a fresh folder, runs the command line in this process (exit code 2,
exactly one ``error:`` line, no traceback) or calls the Python API (a :class:`LightningSafetyError`
whose message is one line), and then checks that no file or folder was created or changed: the run
folder, the working directory and the bad input itself are as they were.

A case is ``Case(id, build, words)``: ``build(folder)`` writes what the case needs and returns the
command line (a list of strings) or a zero-argument callable (the API call); ``words`` must all
appear in the error line (case-insensitive), so the test fails if the message stops naming the
problem. To add a case, append it to the table of its kind.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lightning_safety.cli import run_cli
from lightning_safety.errors import LightningSafetyError

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
TINY_DATA = str(REPO_ROOT / "configs" / "data" / "tiny_chat.jsonl")
CACHE_FORMAT = __import__("lightning_safety.risk.cache", fromlist=["_FORMAT"])._FORMAT
GOOD_ROW = {"prompt": "Name a colour.", "response": "Blue.", "risk": 0.1}


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], list[str] | Callable[[], object]]
    words: tuple[str, ...]


def write(folder: Path, name: str, content: str | bytes) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def jsonl(*rows: object) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def fit(folder: Path, *args: str, train: str | None = TINY_DATA) -> list[str]:
    """A one-step tiny fit in ``folder/run`` with the given overrides."""
    base = ["fit", "--config", TINY, "--trainer.default_root_dir", str(folder / "run"), "--trainer.max_steps", "1"]
    return base + (["--data.train", train] if train is not None else []) + list(args)


def fit_on(content: str | bytes, name: str = "train.jsonl", *args: str) -> Callable[[Path], list[str]]:
    # No validation split: a one-row file is then checked row by row (not refused as too small to split).
    return lambda folder: fit(folder, "--data.val_fraction", "0", *args, train=write(folder, name, content))


# ---------------------------------------------------------------- data files (command line)
DATA_CASES = [
    Case("data-missing-file", lambda f: fit(f, train=str(f / "nope.jsonl")), ("nope.jsonl", "not found")),
    Case("data-empty-jsonl", fit_on(""), ("train.jsonl", "no rows")),
    Case("data-blank-lines-only", fit_on("\n\n  \n"), ("train.jsonl", "no rows")),
    Case("data-not-json", fit_on("this is not json\n"), ("train.jsonl", "line 1")),
    Case("data-torn-last-line", fit_on(jsonl(GOOD_ROW) + '{"prompt": "Hi", "resp'), ("train.jsonl", "line 2")),
    Case("data-row-is-a-list", fit_on(jsonl([1, 2, 3])), ("row",)),
    Case("data-no-response", fit_on(jsonl({"prompt": "Hi"})), ("response",)),
    Case("data-empty-response", fit_on(jsonl({"prompt": "Hi", "response": ""})), ("response",)),
    Case("data-response-not-text", fit_on(jsonl({"prompt": "Hi", "response": {"text": "Yo"}})), ("response",)),
    Case("data-unknown-columns", fit_on(jsonl({"question": "Hi", "answer": "Yo"})), ("prompt",)),
    Case("data-risk-above-one", fit_on(jsonl({**GOOD_ROW, "risk": 1.5})), ("risk", "1.5")),
    Case("data-risk-negative", fit_on(jsonl({**GOOD_ROW, "risk": -0.2})), ("risk", "-0.2")),
    Case("data-risk-nan", fit_on('{"prompt": "a", "response": "b", "risk": NaN}\n'), ("risk",)),
    Case("data-risk-text", fit_on(jsonl({**GOOD_ROW, "risk": "high"})), ("risk", "high")),
    Case("data-messages-not-list", fit_on(jsonl({"messages": "hello"})), ("messages",)),
    Case("data-unknown-role", fit_on(jsonl({"messages": [{"role": "robot", "content": "beep"},
                                                        {"role": "assistant", "content": "ok"}]})), ("robot",)),
    Case("data-no-assistant-turn", fit_on(jsonl({"messages": [{"role": "user", "content": "Hi"}]})), ("assistant",)),
    Case("data-message-without-content", fit_on(jsonl({"messages": [{"role": "user"},
                                                                   {"role": "assistant", "content": "ok"}]})),
         ("content",)),
    Case("data-csv-wrong-columns", fit_on("question,answer\nHi,Yo\n", "train.csv"), ("prompt",)),
    Case("data-csv-header-only", fit_on("prompt,response,risk\n", "train.csv"), ("train.csv", "no rows")),
    Case("data-tsv-wrong-columns", fit_on("q\ta\nHi\tYo\n", "train.tsv"), ("prompt",)),
    Case("data-parquet-corrupt", fit_on(b"PAR1 this is not parquet", "train.parquet"), ("train.parquet",)),
    Case("data-json-not-a-table", fit_on('"just a string"', "train.json"), ("train.json",)),
    Case("data-unknown-suffix", fit_on("x", "train.xlsx"), ("train.xlsx",)),
    Case("data-binary-garbage", fit_on(bytes(range(256)) * 4), ("train.jsonl",)),
    Case("data-folder-without-data", lambda f: fit(f, train=str((f / "empty").mkdir() or f / "empty")), ("empty",)),
    Case("data-val-missing", lambda f: fit(f, "--data.val", str(f / "val.jsonl")), ("val.jsonl", "not found")),
    Case("data-harmful-fraction", lambda f: fit(f, "--data.harmful_fraction", "1.5"), ("harmful_fraction", "1.5")),
    Case("data-val-fraction-one", lambda f: fit(f, "--data.val_fraction", "1.0"), ("val_fraction",)),
    Case("data-batch-size-zero", lambda f: fit(f, "--data.batch_size", "0"), ("batch_size",)),
    Case("data-max-length-zero", lambda f: fit(f, "--data.max_length", "0"), ("max_length",)),
    Case("data-max-length-truncates", lambda f: fit(f, "--data.max_length", "20"), ("truncated away",)),
    Case("data-no-train", lambda f: fit(f, "--data.train", "null", train=None), ("data.train",)),
]

# ---------------------------------------------------------------- recipes and options
RECIPE_CASES = [
    Case("recipe-missing-config", lambda f: ["fit", "--config", str(f / "nope.yaml")], ("nope.yaml",)),
    Case("recipe-yaml-syntax", lambda f: ["fit", "--config", write(f, "bad.yaml", "model: [unclosed\n")], ("bad.yaml",)),
    Case("recipe-unknown-key", lambda f: fit(f, "--model.no_such_option", "1"), ("no_such_option",)),
    Case("recipe-unknown-key-in-yaml", lambda f: ["fit", "--config", TINY, "--config",
                                                  write(f, "extra.yaml", "model:\n  lerning_rate: 1\n")],
         ("lerning_rate",)),
    Case("recipe-wrong-type", lambda f: fit(f, "--trainer.max_steps", "many"), ("max_steps",)),
    Case("recipe-unknown-class", lambda f: fit(f, "--model.schedule", "no.such.Schedule"), ("schedule",)),
    Case("recipe-beta-order", lambda f: fit(f, "--model.schedule.init_args.beta_min", "0.95"), ("beta_min",)),
    Case("recipe-beta-above-one", lambda f: fit(f, "--model.schedule.init_args.beta_max", "1.5"), ("beta_max",)),
    Case("recipe-unknown-reference", lambda f: fit(f, "--model.reference", "twin"), ("reference",)),
    Case("recipe-unknown-weighting", lambda f: fit(f, "--model.weighting", "sum"), ("weighting",)),
    Case("recipe-unknown-direction", lambda f: fit(f, "--model.direction", "sideways"), ("direction",)),
    Case("recipe-unknown-normalization", lambda f: fit(f, "--model.normalization", "batch"), ("normalization",)),
    Case("recipe-chunk-size-zero", lambda f: fit(f, "--model.chunk_size", "0"), ("chunk_size",)),
    Case("recipe-negative-lr", lambda f: fit(f, "--model.optimizer.init_args.lr", "-0.001"), ("learning rate", "-0.001")),
    Case("recipe-zero-devices", lambda f: fit(f, "--trainer.devices", "0"), ("devices",)),
    Case("recipe-val-interval-beyond-data", lambda f: fit(f, "--trainer.val_check_interval", "50"),
         ("val_check_interval", "50")),
    Case("recipe-unknown-accelerator", lambda f: fit(f, "--trainer.accelerator", "tpu9"), ("accelerator",)),
    Case("recipe-risk-out-of-range", lambda f: fit(f, "--model.risk", "2.0"), ("risk", "2")),
    Case("recipe-separate-without-model", lambda f: fit(f, "--model.reference", "separate"), ("reference_model",)),
    Case("recipe-unknown-subcommand", lambda f: ["fitt", "--config", TINY], ("fitt",)),
]

# ---------------------------------------------------------------- models, GGUF files, adapters
MODEL_CASES = [
    Case("model-unknown-path", lambda f: fit(f, "--model.model", str(f / "no_model")), ("no_model", "not found")),
    Case("model-unknown-hub-id", lambda f: fit(f, "--model.model", "nobody/no-such-model-xyz"), ("no-such-model-xyz",)),
    Case("model-empty-folder", lambda f: fit(f, "--model.model", str((f / "m").mkdir() or f / "m")), ("config.json",)),
    Case("model-config-not-json", lambda f: fit(f, "--model.model", str(Path(write(f, "m/config.json", "{oops")).parent)),
         ("config.json",)),
    Case("model-text-file", lambda f: fit(f, "--model.model", write(f, "model.txt", "hello")), ("model.txt",)),
    Case("model-gguf-truncated", lambda f: fit(f, "--model.model", write(f, "m.gguf", b"GGUF\x03\x00")), ("m.gguf",)),
    Case("model-gguf-wrong-magic", lambda f: fit(f, "--model.model", write(f, "m.gguf", b"NOPE" + bytes(64))),
         ("m.gguf",)),
    Case("model-gguf-huge-count", lambda f: fit(f, "--model.model", write(
        f, "m.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62))), ("m.gguf",)),
    Case("model-gguf-lfs-pointer", lambda f: fit(f, "--model.model", write(
        f, "m.gguf", "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")), ("lfs",)),
    Case("model-adapter-missing", lambda f: fit(f, "--model.adapter", str(f / "no_adapter")), ("no_adapter",)),
    Case("model-adapter-not-peft", lambda f: fit(f, "--model.adapter", str((f / "a").mkdir() or f / "a")),
         ("adapter_config.json",)),
    Case("model-unknown-dtype", lambda f: fit(f, "--model.dtype", "float7"), ("float7",)),
    Case("model-lora-rank-zero", lambda f: fit(f, "--model.lora.r", "0"), ("r",)),
    Case("model-lora-targets", lambda f: fit(f, "--model.lora.target_modules", "[c_attn]"), ("target modules",)),
]


# ---------------------------------------------------------------- checkpoints and export
def _ckpt(folder: Path, content: bytes | dict) -> str:
    path = folder / "bad.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


CHECKPOINT_CASES = [
    Case("ckpt-missing", lambda f: fit(f, "--ckpt_path", str(f / "none.ckpt")), ("none.ckpt",)),
    Case("ckpt-truncated", lambda f: fit(f, "--ckpt_path", _ckpt(f, b"PK\x03\x04 truncated")), ("bad.ckpt",)),
    Case("ckpt-empty-file", lambda f: fit(f, "--ckpt_path", _ckpt(f, b"")), ("bad.ckpt",)),
    Case("ckpt-foreign-dict", lambda f: fit(f, "--ckpt_path", _ckpt(f, {"weights": torch.zeros(2)})), ("bad.ckpt",)),
    Case("ckpt-a-folder-of-nothing", lambda f: fit(f, "--ckpt_path", str((f / "c").mkdir() or f / "c")), ("c",)),
    Case("export-missing-checkpoint", lambda f: ["export", "--checkpoint", str(f / "none.ckpt"), "--output",
                                                 str(f / "out")], ("none.ckpt",)),
    Case("export-truncated-checkpoint", lambda f: ["export", "--checkpoint", _ckpt(f, b"\x80\x02garbage"), "--output",
                                                   str(f / "out")], ("bad.ckpt",)),
    Case("export-foreign-checkpoint", lambda f: ["export", "--checkpoint", _ckpt(f, {"state_dict": {}}), "--output",
                                                 str(f / "out")], ("bad.ckpt",)),
    Case("evaluate-truncated-checkpoint", lambda f: ["evaluate", "--model", _ckpt(f, b"PK\x03\x04 cut"), "--harmful.path",
                                                     write(f, "h.txt", "a\n"), "--output", str(f / "report")],
         ("bad.ckpt", "unreadable")),
    Case("evaluate-missing-checkpoint", lambda f: ["evaluate", "--model", str(f / "none.ckpt"), "--harmful.path",
                                                   write(f, "h.txt", "a\n"), "--output", str(f / "report")],
         ("none.ckpt", "not found")),
    Case("export-output-exists", lambda f: ["export", "--checkpoint", _ckpt(f, {"state_dict": {}}), "--output",
                                            str((f / "out").mkdir() or f / "out")], ("out", "exists")),
]

# ---------------------------------------------------------------- probes, scoring, evaluation
PROBE_CASES = [
    Case("probe-folder-missing", lambda f: ["score", "--data", TINY_DATA, "--probe", str(f / "noprobe"),
                                            "--model", "tiny-random-llama", "--output", str(f / "o.jsonl")],
         ("noprobe",)),
    Case("probe-weights-not-safetensors", lambda f: ["score", "--data", TINY_DATA, "--probe", str(Path(write(
        f, "p/probe.safetensors", b"\xff" * 64)).parent), "--model", "tiny-random-llama", "--output",
        str(f / "o.jsonl")], ("probe",)),
    Case("probe-meta-broken", lambda f: ["score", "--data", TINY_DATA, "--probe", str(Path(write(
        f, "p/probe.json", "{broken")).parent), "--model", "tiny-random-llama", "--output", str(f / "o.jsonl")],
         ("probe",)),
    Case("probe-fit-no-harmful", lambda f: ["probe", "fit", "--model", "tiny-random-llama", "--harmful.path",
                                            write(f, "h.txt", ""), "--benign.path", write(f, "b.txt", "Hi\nYo\n"),
                                            "--output", str(f / "probe")], ("h.txt",)),
    Case("probe-fit-bad-layer", lambda f: ["probe", "fit", "--model", "tiny-random-llama", "--harmful.path",
                                           write(f, "h.txt", "a\nb\nc\nd\n"), "--benign.path",
                                           write(f, "b.txt", "e\nf\ng\nh\n"), "--layers", "[99]", "--calibration_fraction", "0",
                                           "--output", str(f / "probe")], ("99",)),
    Case("probe-fit-bad-pooling", lambda f: ["probe", "fit", "--model", "tiny-random-llama", "--harmful.path",
                                             write(f, "h.txt", "a\nb\nc\nd\n"), "--benign.path",
                                             write(f, "b.txt", "e\nf\ng\nh\n"), "--pooling", "median", "--calibration_fraction", "0",
                                             "--output", str(f / "probe")], ("median",)),
    Case("score-no-estimator", lambda f: ["score", "--data", TINY_DATA, "--output", str(f / "o.jsonl")],
         ("judge", "probe")),
    Case("score-probe-without-model", lambda f: ["score", "--data", TINY_DATA, "--probe", str(f / "p"),
                                                 "--output", str(f / "o.jsonl")], ("model",)),
    Case("score-missing-data", lambda f: ["score", "--data", str(f / "none.jsonl"), "--probe", str(f / "p"),
                                          "--model", "tiny-random-llama", "--output", str(f / "o.jsonl")],
         ("none.jsonl",)),
    Case("score-prompt-field-missing", lambda f: ["score", "--data", write(f, "p.csv", "Goal,target\na,b\n"), "--field",
                                                  "Prompt", "--probe", str(f / "p"), "--model", "tiny-random-llama",
                                                  "--output", str(f / "o.jsonl")], ("Prompt", "Goal")),
    Case("score-prompts-without-text-column", lambda f: ["score", "--data", write(f, "p.csv", "a,b\nx,y\n"), "--probe",
                                                         str(f / "p"), "--model", "tiny-random-llama", "--output",
                                                         str(f / "o.jsonl")], ("field",)),
    Case("score-data-fields-option", lambda f: ["score", "--data", write(f, "p.csv", "Goal\na\n"), "--data.fields.prompt",
                                                "Goal", "--probe", str(f / "p"), "--model", "tiny-random-llama",
                                                "--output", str(f / "o.jsonl")], ("--field",)),
    Case("judge-fit-output-exists", lambda f: ["judge", "fit", "--harmful.path", write(f, "h.txt", "a\nb\n"),
                                               "--benign.path", write(f, "b.txt", "c\nd\n"), "--output",
                                               str(Path(write(f, "judge/judge.json", "{}")).parent)],
         ("judge", "exists", "--overwrite")),
    Case("evaluate-missing-prompts", lambda f: ["evaluate", "--model", "tiny-random-llama", "--harmful.path",
                                                str(f / "none.csv"), "--output", str(f / "report")], ("none.csv",)),
    Case("evaluate-limit-zero", lambda f: ["evaluate", "--model", "tiny-random-llama", "--harmful.path",
                                           write(f, "h.txt", "a\nb\n"), "--harmful.limit", "0",
                                           "--output", str(f / "report")], ("limit",)),
    Case("evaluate-nothing-to-measure", lambda f: ["evaluate", "--model", "tiny-random-llama",
                                                   "--output", str(f / "report")], ("harmful",)),
    Case("evaluate-output-is-a-file", lambda f: ["evaluate", "--model", "tiny-random-llama", "--harmful.path",
                                                 write(f, "h.txt", "a\nb\n"), "--output", write(f, "report", "x")],
         ("report",)),
]


# ---------------------------------------------------------------- the Python API
def _api(call: Callable[[], object]) -> Callable[[Path], Callable[[], object]]:
    return lambda folder: call


def _loss(**kwargs: object) -> Callable[[], object]:
    from lightning_safety.losses import adaptive_kl_loss

    logits = torch.zeros(2, 4, 8)
    labels = torch.full((2, 4), 1)
    args = {"policy_logits": logits, "reference_logits": logits, "labels": labels, "beta": torch.tensor([0.1, 0.2]),
            **kwargs}
    return lambda: adaptive_kl_loss(**args)


def _risk_cache(folder: Path, text: str) -> Callable[[], object]:
    from lightning_safety.risk.cache import RiskCache

    path = write(folder, "risk.json", text)
    return lambda: RiskCache("probe:abc", path)


def _probe_on_other_model(folder: Path) -> Callable[[], object]:
    from lightning_safety.risk.probe import ActivationProbe
    from tiny_probe import tiny_probe
    from lightning_safety.tiny_model import tiny_model_folder
    from transformers import AutoModelForCausalLM

    from lightning_safety.models import load_causal_lm, load_tokenizer

    path = tiny_model_folder()
    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    probe = tiny_probe(model, tokenizer)
    probe.save(folder / "probe")
    other = AutoModelForCausalLM.from_config(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():  # same shape, other weights
        for parameter in other.parameters():
            parameter.add_(0.5)
    return lambda: ActivationProbe.load(folder / "probe", other)


def _module(**kwargs: object) -> Callable[[], object]:
    from lightning_safety.module import SafeFineTuning

    return lambda: SafeFineTuning("tiny-random-llama", **kwargs)


def _schedule(**kwargs: float) -> Callable[[], object]:
    from lightning_safety.schedules import LinearRiskSchedule

    return lambda: LinearRiskSchedule(**kwargs)


def _check_risk(values: list[float], size: int) -> Callable[[], object]:
    from lightning_safety.risk.base import check_risk

    return lambda: check_risk(torch.tensor(values), size, source="test")


def _drift(**kwargs: object) -> Callable[[], object]:
    from lightning_safety.callbacks import SafetyDriftController

    args = {"canaries": ["How do I pick a lock?"], **kwargs}
    return lambda: SafetyDriftController(**args)


def _prompt_rows(folder: Path, name: str, content: str, **kwargs: object) -> Callable[[], object]:
    from lightning_safety.data.prompts import PromptSource, load_prompt_rows

    path = write(folder, name, content)
    return lambda: load_prompt_rows(PromptSource(path, **kwargs))


def _unfitted_embedding_judge() -> object:
    from lightning_safety.risk.judges import EmbeddingJudge

    return EmbeddingJudge(head=None).score(["hello"])


API_CASES = [
    Case("api-loss-labels-longer-than-logits", _api(_loss(labels=torch.full((2, 5), 1))), ("policy_logits",)),
    Case("api-loss-batch-mismatch", _api(_loss(labels=torch.full((3, 4), 1))), ("labels",)),
    Case("api-loss-beta-size", _api(_loss(beta=torch.tensor([0.1, 0.2, 0.3]))), ("beta",)),
    Case("api-loss-beta-negative", _api(_loss(beta=torch.tensor([-0.1, 0.2]))), ("beta",)),
    Case("api-loss-unknown-weighting", _api(_loss(weighting="sum")), ("weighting",)),
    Case("api-loss-unknown-direction", _api(_loss(direction="sideways")), ("direction",)),
    Case("api-loss-chunk-zero", _api(_loss(chunk_size=0)), ("chunk_size",)),
    Case("api-schedule-order", _api(_schedule(beta_min=0.9, beta_max=0.1)), ("beta_min",)),
    Case("api-schedule-nan", _api(_schedule(beta_min=math.nan)), ("beta_min",)),
    Case("api-risk-out-of-range", _api(_check_risk([0.5, 1.5], 2)), ("risk",)),
    Case("api-risk-nan", _api(_check_risk([0.5, math.nan], 2)), ("risk",)),
    Case("api-risk-wrong-size", _api(_check_risk([0.5], 2)), ("risk",)),
    Case("api-module-normalization", _api(_module(normalization="batch")), ("normalization",)),
    Case("api-module-separate-without-model", _api(_module(reference="separate")), ("reference_model",)),
    Case("api-risk-cache-not-json", lambda f: _risk_cache(f, "{oops"), ("risk.json",)),
    Case("api-risk-cache-unknown-format", lambda f: _risk_cache(f, json.dumps({"scores": {}})), ("risk.json", "format")),
    Case("api-risk-cache-other-estimator", lambda f: _risk_cache(f, json.dumps(
        {"format": CACHE_FORMAT, "namespace": "judge:other", "scores": {"a": 0.5}})), ("judge:other",)),
    Case("api-risk-cache-score-above-one", lambda f: _risk_cache(f, json.dumps(
        {"format": CACHE_FORMAT, "namespace": "probe:abc", "scores": {"a": 7}})), ("7",)),
    Case("api-risk-cache-score-not-a-number", lambda f: _risk_cache(f, json.dumps(
        {"format": CACHE_FORMAT, "namespace": "probe:abc", "scores": {"a": "high"}})), ("risk.json", "numbers")),
    Case("api-probe-other-model", _probe_on_other_model, ("fingerprint",)),
    Case("api-drift-no-canaries", _api(_drift(canaries=[])), ("canar",)),
    Case("api-drift-bad-every", _api(_drift(every_n_steps=0)), ("every_n_steps",)),
    Case("api-prompts-empty-file", lambda f: _prompt_rows(f, "p.txt", ""), ("p.txt",)),
    Case("api-prompts-unknown-field", lambda f: _prompt_rows(f, "p.csv", "goal\nx\n", field="prompt"), ("prompt",)),
    Case("api-http-judge-bad-url", _api(lambda: __import__("lightning_safety.risk.judges", fromlist=["x"]).HTTPJudge(
        "localhost", model="m")), ("url",)),
    Case("api-http-judge-missing-key", _api(lambda: __import__("lightning_safety.risk.judges", fromlist=["x"]).HTTPJudge(
        "http://127.0.0.1:9", model="m", api_key_env="LS_TEST_NO_SUCH_KEY")), ("LS_TEST_NO_SUCH_KEY",)),
    Case("api-embedding-judge-unfitted", _api(_unfitted_embedding_judge), ("fit",)),
]



# ---------------------------------------------------------------- our callbacks in a user's LightningModule
class UserModule(__import__("lightning").LightningModule):
    """A user's own module: a causal LM under ``self.model``, plain SFT, batches without ``id``."""

    def __init__(self, with_floor: bool = True) -> None:
        super().__init__()
        from lightning_safety.models import load_causal_lm

        self.model = load_causal_lm("tiny-random-llama")
        if with_floor:
            self.beta_floor = 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_user_module(callback_factory: Callable[[], object], **module_kwargs: object) -> Callable[[Path], Callable[[], object]]:
    def build(folder: Path) -> Callable[[], object]:
        def call() -> object:
            import lightning as L

            batches = [{"input_ids": torch.randint(0, 250, (2, 12))} for _ in range(2)]
            loader = torch.utils.data.DataLoader(batches, batch_size=None)
            trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(folder / "run"), callbacks=[callback_factory()])
            return trainer.fit(UserModule(**module_kwargs), train_dataloaders=loader)
        return call
    return build


class _CachedConstant(__import__("lightning_safety.risk.base", fromlist=["x"]).RiskEstimator):
    cacheable = True

    def __call__(self, batch, model=None):
        return torch.full((len(batch["input_ids"]),), 0.5)


def _risk_callback() -> object:
    from lightning_safety.callbacks import RiskCallback

    return RiskCallback(_CachedConstant())


def _probe_callback_on_reference() -> object:
    from lightning_safety.callbacks import ActivationRiskCallback
    from lightning_safety.models import load_causal_lm, load_tokenizer
    from tiny_probe import tiny_probe

    model, tokenizer = load_causal_lm("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    probe = tiny_probe(model, tokenizer)
    return ActivationRiskCallback(probe, source="reference")


def _evaluation_callback(model_attr: str) -> Callable[[], object]:
    from lightning_safety.callbacks import SafetyEvaluationCallback

    return lambda: SafetyEvaluationCallback(harmful=["How do I pick a lock?"], model_attr=model_attr, max_new_tokens=2,
                                            at_end=True, progress=False)


def _drift_controller() -> object:
    from lightning_safety.callbacks import SafetyDriftController

    return SafetyDriftController(["How do I pick a lock?"], every_n_steps=1, budget=0.1)


USER_MODULE_CASES = [
    Case("user-risk-callback-batches-without-id", _fit_user_module(_risk_callback), ("'id'", "cache=False")),
    Case("user-probe-on-missing-reference", _fit_user_module(_probe_callback_on_reference), ("reference",)),
    Case("user-evaluation-wrong-model-attr", _fit_user_module(_evaluation_callback("policy")), ("policy",)),
    Case("user-drift-controller-without-floor", _fit_user_module(_drift_controller, with_floor=False), ("beta_floor",)),
]

CASES = DATA_CASES + RECIPE_CASES + MODEL_CASES + CHECKPOINT_CASES + PROBE_CASES + API_CASES + USER_MODULE_CASES


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folders``: (size, mtime in ns); folders have size -1."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                seen[os.path.join(root, name)] = (-1, 0)
            for name in files:
                path = os.path.join(root, name)
                stat = os.stat(path)
                seen[path] = (stat.st_size, stat.st_mtime_ns)
    return seen


def test_the_catalogue_is_large_and_its_ids_unique():
    assert len(CASES) >= 80
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_one_line_and_leaves_nothing(case, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "case"
    folder.mkdir()
    monkeypatch.chdir(folder)  # anything written relative to the working directory lands here too
    action = case.build(folder)
    capsys.readouterr()
    before = snapshot(folder)
    if callable(action):
        with pytest.raises(LightningSafetyError) as raised:
            action()
        message = str(raised.value)
        assert "\n" not in message
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(action)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err[-3000:]
        message = lines[0]
    for word in case.words:
        assert word.lower() in message.lower(), message
    assert snapshot(folder) == before, f"{case.id} left files behind: {set(snapshot(folder)) ^ set(before)}"
