"""Training driven by the held-out metric: keep the best weights, stop when it stops improving, and say
so when the model starts memorising its training set.

A stage names the metric (`Stage.held_out`: test MSE for stage 1, test bits per code for stage 2,
lower is better) and the training metric that mirrors it; the loop feeds every evaluation to
`HeldOut.update` and acts on the verdict. A stage may also bound the metric by a second one
(`held_out_within`): stage 1 judging sharpness keeps the lowest reconstruction FID among the evaluations
whose PSNR is within a slack of the best PSNR seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Verdict:
    improved: bool          # a new best: its weights become the stage's weights
    stop: bool              # `patience` evaluations without improvement
    warning: str | None     # test metric rising while the training metric falls


@dataclass
class HeldOut:
    """Best test value so far and how long ago it was; saved in the training state for resume."""

    metric: str                          # the test metric, lower is better
    train_metric: str                    # its training-log counterpart
    patience: int = 0                    # 0: never stop early
    within: tuple[str, float] | None = None  # (a higher-is-better test metric, slack): only evaluations within
    #                                          slack of its best so far may be kept
    best_step: int = 0
    best_value: float | None = None
    best_train: float | None = None      # the training metric when the best was seen
    evals_since_best: int = 0            # evaluations since the last improvement (under `within`: of either)
    top: float | None = None             # `within`: its metric's best value so far ...
    best_top: float | None = None        # ... and the kept evaluation's

    def update(self, step: int, test: dict[str, float], train: dict[str, float]) -> Verdict:
        value, train_now = test[self.metric], train.get(self.train_metric)
        rose = False  # under `within`: a new best of the bounding metric
        if self.within is not None:
            now = test[self.within[0]]
            rose = self.top is not None and now > self.top
            self.top = now if self.top is None else max(self.top, now)
        if self._better(value, test):
            self.best_step, self.best_value, self.best_train = step, value, train_now
            self.best_top = test[self.within[0]] if self.within else None
            self.evals_since_best = 0
            return Verdict(improved=True, stop=False, warning=None)
        # under `within`, a new best of the bounding metric is progress too: early stopping waits for neither to
        # improve (a noisy FID that stalls while the PSNR still rises must not end the run, as it did before an
        # adversarial phase had even begun)
        self.evals_since_best = 0 if rose else self.evals_since_best + 1
        warning = None  # under `within` the metric is not one of generalisation (stage 1's FID): no memorising
        if (self.within is None and self.evals_since_best == 2 and train_now is not None and self.best_train is not None
                and train_now < self.best_train):
            warning = (f"test {self.metric} has not improved for 2 evaluations ({self.best_value:.4g} at step "
                       f"{self.best_step}, {value:.4g} at step {step}) while training {self.train_metric} fell "
                       f"({self.best_train:.4g} -> {train_now:.4g}): the model is memorising its training set; "
                       f"the run keeps step {self.best_step}'s weights (more dropout, weight decay or --augment "
                       "would help)")
        return Verdict(improved=False, stop=bool(self.patience) and self.evals_since_best >= self.patience,
                       warning=warning)

    def _better(self, value: float, test: dict[str, float]) -> bool:
        """Whether this evaluation replaces the kept one: a lower metric; under `within`, only an evaluation
        within the slack of the best seen, and then also one that replaces a kept evaluation left behind
        by a later rise of that best (so the kept weights never trail the best by more than the slack)."""
        if self.within is None:
            return self.best_value is None or value < self.best_value
        name, slack = self.within
        if test[name] < self.top - slack:  # self.top: the best so far, this evaluation included
            return False
        kept_behind = self.best_top is None or self.best_top < self.top - slack
        return self.best_value is None or kept_behind or value < self.best_value

    def stalled(self) -> str:
        """What has not improved, for the early-stopping message."""
        if self.within is None:
            return f"test {self.metric} has not improved for {self.evals_since_best} evaluations"
        return f"neither test {self.metric} nor {self.within[0]} has improved for {self.evals_since_best} evaluations"

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("metric", "train_metric", "patience", "within")}

    def record(self) -> dict[str, float]:
        """What metrics.jsonl and `vqgen info` show with each evaluation."""
        return {"best_step": self.best_step, f"best_{self.metric}": self.best_value}
