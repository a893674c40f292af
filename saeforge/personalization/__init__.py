"""Latent personalization (DEP, arXiv 2507.20849): a user's history and how it differs from peers', embedded by
the frozen model, through a sparse autoencoder and alignment MLPs into soft tokens (``docs/personalization.md``).

    from saeforge.personalization import (PersonalizeEvalConfig, PersonalizeTrainConfig, evaluate_personalizer,
                                          synthetic_users, train_personalizer, write_users)

    write_users("users.jsonl", synthetic_users(40))
    train_personalizer(PersonalizeTrainConfig(users="users.jsonl", out="dep_run"))
    report = evaluate_personalizer(PersonalizeEvalConfig(run="dep_run"))
"""

from saeforge.personalization.evaluate import (CONDITIONS, PersonalizeEvalConfig, evaluate_personalizer,
                                               score_table)
from saeforge.personalization.model import DEPAdapter, DifferenceSAE, UserInputs, embed_texts, user_inputs
from saeforge.personalization.rouge import rouge_1, rouge_l
from saeforge.personalization.train import (PersonalizeTrainConfig, TrainedPersonalizer, load_personalizer,
                                            train_personalizer)
from saeforge.personalization.users import (STYLE_TRAITS, HistoryItem, Query, User, detect_style, read_users,
                                            style_match, synthetic_users, write_users)

__all__ = ["CONDITIONS", "DEPAdapter", "DifferenceSAE", "HistoryItem", "PersonalizeEvalConfig",
           "PersonalizeTrainConfig", "Query", "STYLE_TRAITS", "TrainedPersonalizer", "User", "UserInputs",
           "detect_style", "embed_texts", "evaluate_personalizer", "load_personalizer", "read_users", "rouge_1",
           "rouge_l", "score_table", "style_match", "synthetic_users", "train_personalizer", "user_inputs",
           "write_users"]
