"""Harm judges: score training examples (request, and optionally response) in [0, 1].

Backends:

* :class:`RubricJudge`: any chat LM rating the example 1-5 on a harm rubric (expected rating
  from the digit probabilities), the "Safety Critic" of arXiv 2602.17546;
* :class:`GuardModelJudge`: a guard model (Llama Guard 3, ShieldGemma) read as P(unsafe);
* :class:`ClassifierJudge`: a sequence classifier, P(harmful label);
* :class:`EmbeddingJudge`: sentence embeddings (all-MiniLM-L6-v2) + a logistic head trained here;
* :class:`HTTPJudge`: the rubric asked of an OpenAI-compatible server.

All share :class:`Judge`: batched, sanitised against prompt injection
(:mod:`lightning_safety.risk.text`), and fail-closed (a row that cannot be scored gets 1.0 and
``failed=True``).
"""

from lightning_safety.risk.judges.base import Judge, JudgeResult, RowFailure
from lightning_safety.risk.judges.causal import CausalLMJudge, GuardModelJudge, RubricJudge
from lightning_safety.risk.judges.classifier import ClassifierJudge
from lightning_safety.risk.judges.embedding import (
    DEFAULT_ENCODER,
    EmbeddingJudge,
    LogisticHead,
    SentenceEncoder,
    default_encoder_path,
    train_logistic_head,
)
from lightning_safety.risk.judges.remote import HTTPJudge, chat_completions_url
from lightning_safety.risk.judges.rubric import ANSWER_FORMAT, DEFAULT_RUBRIC, RATING_PRIMER, parse_rating, rating_to_score

__all__ = [
    "ANSWER_FORMAT",
    "DEFAULT_ENCODER",
    "DEFAULT_RUBRIC",
    "RATING_PRIMER",
    "CausalLMJudge",
    "ClassifierJudge",
    "EmbeddingJudge",
    "GuardModelJudge",
    "HTTPJudge",
    "Judge",
    "JudgeResult",
    "LogisticHead",
    "RowFailure",
    "RubricJudge",
    "SentenceEncoder",
    "chat_completions_url",
    "default_encoder_path",
    "parse_rating",
    "rating_to_score",
    "train_logistic_head",
]
