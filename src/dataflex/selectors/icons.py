"""``icons``: LESS scores against several target tasks, one ranking per task, combined by a vote.

ICONS (Influence CONsensus, arXiv:2501.00654) keeps the training samples that many target tasks
agree on, instead of those that one task - or the average of all - likes best. The eval set is
the tasks' validation sets one after another; ``task_boundaries`` gives their sizes in that order
(they must add up to the eval set's rows). Unset: the eval datasets given separately
(``eval_dataset: a,b`` with ``eval_on_each_dataset: true``), else the whole eval set is one task.

At every selection, with the model as it is then (see :mod:`dataflex.selectors.less`):

1. Score_k(z): the mean cosine of the training sample's Adam update direction with the gradients
   of task k's eval rows - ``less``'s Score against that task alone;
2. S_k(z) = Σ_j η_j · Score_k,j(z) over the selections so far (``cumulative: false``: Score_k(z));
3. every task votes for its ``num_samples`` rows of highest S_k (with all rows tied with the last
   of them: the original's threshold, the 1 − num_samples / pool quantile);
4. rows are ranked by their number of votes, then by the mean of S_k over the tasks, then by the
   mean current Score, then by index, and the first ``num_samples`` are taken.

With one task the vote only splits the ranking of ``less`` in two, so the choice is ``less``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..component import register
from ..errors import ConfigError
from ..scoring.gradients import GradientFeaturizer, sharded_features
from .base import SelectionContext, SelectionResult, logger, nothing_supervised, take_ranked
from .less import GradientFeatureParams, LessSelector, group_means, scored_rows


@dataclass
class IconsParams(GradientFeatureParams):
    cumulative: bool = field(
        default=True,
        metadata={"help": "Each task's ranking by the sum of lr x its Score over the selections so far (true) or by "
                          "this selection's Score only (false, as the original)."},
    )
    task_boundaries: list[int] | None = field(
        default=None,
        metadata={"help": "Rows of each task's part of the eval set, in order, summing to its size. Unset: the eval "
                          "datasets given separately (eval_on_each_dataset: true), else one task."},
    )

    inert = {"save_interval": "the original's interval for flushing gradient files; here no gradient is stored, "
                              "only scores, computed in memory at every selection"}

    def check(self) -> None:
        super().check()
        if self.proj_dim < 1:
            self.fail("proj_dim", "an integer >= 1 (e.g. 4096 or 8192)")
        if self.task_boundaries is not None and any(size < 1 for size in self.task_boundaries):
            self.fail("task_boundaries", "a list of row counts >= 1 (one per task), or null")


def task_groups(boundaries: list[int] | None, eval_size: int,
                eval_groups: list[tuple[str, int, int]] | None) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` of every task in the eval set: from ``boundaries`` (sizes), else the eval
    datasets given separately, else the whole set."""
    if boundaries:
        if sum(boundaries) != eval_size:
            raise ValueError(f"task_boundaries {boundaries} sum to {sum(boundaries)}, the eval set has {eval_size} rows")
        groups, start = [], 0
        for k, size in enumerate(boundaries):
            groups.append((f"task {k + 1}", start, start + size))
            start += size
        return groups
    if eval_groups:
        return list(eval_groups)
    return [("eval set", 0, eval_size)]


def consensus(S: torch.Tensor, now: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor, list[float]]:
    """The vote over ``[P, K]`` per-task scores ``S`` (NaN rows: unscored), ``now`` the current Scores.

    Task t votes for every row whose S_t is at least its ``k``-th highest. Returns the scored rows in
    order (more votes, then higher mean S, then higher mean ``now``, then lower position), the votes
    per row and each task's threshold.
    """
    valid = scored_rows(S)
    votes = torch.zeros(len(S), dtype=torch.long)
    n = int(valid.sum())
    if n == 0:
        return [], votes, []
    thresholds = []
    for t in range(S.shape[1]):
        tau = torch.topk(S[valid, t], min(k, n)).values[-1]
        votes[valid] += (S[valid, t] >= tau).long()
        thresholds.append(float(tau))
    mean_s, mean_now = S.mean(dim=1), now.mean(dim=1)
    rows = [i for i in range(len(S)) if bool(valid[i])]
    order = sorted(rows, key=lambda i: (-int(votes[i]), -float(mean_s[i]), -float(mean_now[i]), i))
    return order, votes, thresholds


@register
class IconsSelector(LessSelector):
    name = "icons"
    Params = IconsParams
    summary = "ICONS: LESS rankings against each target task, combined by a majority vote"

    def __init__(self, params: IconsParams):
        super().__init__(params)
        self.tasks: list[tuple[str, int, int]] = []  # (name, start, end) of every task in the eval set

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        bounds = self.params.task_boundaries
        if bounds and eval_size is not None and sum(bounds) != eval_size:
            raise ConfigError(f"component '{self.params._component()}': param 'task_boundaries' = {bounds} sums to "
                              f"{sum(bounds)}, but the eval set has {eval_size} rows after tokenization; allowed: "
                              f"task sizes summing to {eval_size}")

    def eval_target(self, ctx: SelectionContext, plain: GradientFeaturizer) -> tuple[torch.Tensor, int]:
        """One target per task: the mean of its eval rows' unit gradient features."""
        feats = sharded_features(ctx.scorer, ctx.eval_dataset, range(len(ctx.eval_dataset)),
                                 self.params.scoring_batch_size, plain, desc="icons eval gradients")
        self.tasks = task_groups(self.params.task_boundaries, len(ctx.eval_dataset), ctx.eval_groups)
        return group_means(feats, self.tasks, self.name, what="task")

    def select(self, ctx: SelectionContext) -> SelectionResult:
        p = self.params
        pool, score, gradient_type, n_eval = self.target_scores(ctx)  # score: [P, K]
        lr = float(ctx.learning_rate)
        cumulative = self.accumulate(ctx, pool, score)  # kept either way, as less does
        S = cumulative if p.cumulative else score  # what each task ranks by
        order, votes, thresholds = consensus(S, score, ctx.num_samples)
        if not order:
            raise nothing_supervised()
        positions, repeated = take_ranked(len(order), ctx.num_samples, self.name, ctx.rank)
        picks = [order[r] for r in positions]
        scored = scored_rows(score)
        K = score.shape[1]
        if ctx.rank == 0:
            chosen = votes[torch.tensor(picks)]
            logger.info("[DataFlex] %s: %d eval / %d train gradients (%s, proj_dim %d, lr %.3g), %d tasks; the chosen "
                        "have %d to %d votes; %d unscored", self.name, n_eval, int(scored.sum()), gradient_type,
                        p.proj_dim, lr, K, int(chosen.min()), int(chosen.max()), int((~scored).sum()))
        return SelectionResult(
            [pool[i] for i in picks],
            per_sample={
                "votes": [int(votes[i]) for i in picks],
                "task_scores": [[float(v) for v in S[i]] for i in picks],
                "score": [float(score[i].mean()) for i in picks],
                "cumulative_score": [float(cumulative[i].mean()) for i in picks],
            },
            summary={
                "gradient_type": gradient_type,
                "learning_rate": lr,
                "ranked_by": "votes on cumulative_score" if p.cumulative else "votes on score",
                "eval_samples": n_eval,
                "tasks": [[name, end - start] for name, start, end in self.tasks],
                "task_thresholds": thresholds,
                "scored": int(scored.sum()),
                "unscored": int((~scored).sum()),
                "replacement": repeated,
            },
        )
