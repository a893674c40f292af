"""``saeforge personalize ACTION``: synthetic users, DEP training and its evaluation (one config dataclass per action,
whose field docstrings are the ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from saeforge.errors import SaeforgeError
from saeforge.personalization.evaluate import PersonalizeEvalConfig, run_personalize_eval
from saeforge.personalization.train import PersonalizeTrainConfig, run_personalize_train

__all__ = ["PERSONALIZE_ACTIONS", "SyntheticUsersConfig", "run_synthetic_users"]


@dataclass(frozen=True)
class SyntheticUsersConfig:
    """Write synthetic users who comment on lines of the embedded Shakespeare corpus, each in a style of four
    measurable traits (voice archaic/plain, exclaim/calm, focus on words/story, long/short), as a user file."""

    out: str = "users.jsonl"
    """User file to write (JSON lines)."""
    users: int = 40
    """Number of users (the 16 trait combinations are dealt out evenly)."""
    items: int = 60
    """Lines of verse shared by the users (items they comment on)."""
    history: int = 10
    """History comments per user."""
    train_queries: int = 6
    """Comments per user to learn from."""
    test_queries: int = 2
    """Comments per user to score."""
    seed: int = 0
    """Seed of the lines, the styles and the phrasing."""


def run_synthetic_users(cfg: SyntheticUsersConfig) -> None:
    from saeforge.personalization.users import synthetic_users, write_users

    if min(cfg.users, cfg.items, cfg.history) <= 0 or min(cfg.train_queries, cfg.test_queries) < 0:
        raise SaeforgeError("--users, --items and --history must be positive, the query counts not negative",
                            "pass e.g. --users 40 --items 60 --history 10")
    users = synthetic_users(cfg.users, cfg.items, cfg.history, cfg.train_queries, cfg.test_queries, cfg.seed)
    write_users(cfg.out, users)
    print(f"wrote {len(users)} users ({cfg.history} history, {cfg.train_queries} train and {cfg.test_queries} test "
          f"comments each, over {cfg.items} lines) to {cfg.out}")
    print(f"e.g. {users[0].user_id} ({', '.join(users[0].style.values())}): {users[0].history[0].text}")


PERSONALIZE_ACTIONS: dict[str, tuple[type, Callable, str]] = {
    "users": (SyntheticUsersConfig, run_synthetic_users, "write synthetic users with measurable styles"),
    "train": (PersonalizeTrainConfig, run_personalize_train,
              "train DEP's sparse autoencoder and alignment MLPs, the model frozen (resumable)"),
    "eval": (PersonalizeEvalConfig, run_personalize_eval,
             "ROUGE and style match of DEP against no history and history as text"),
}
