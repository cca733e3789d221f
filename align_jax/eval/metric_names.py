"""What the report's numbers mean: a readable name, which way is better, the precision to print, and the
key that holds each metric's sample count; and, for training curves, which logged keys to plot.

    describe("constraints/prompt_acc")   # Metric(name="Constraint following, prompt level", direction=HIGHER,
                                         #        decimals=3, count="constraints/n_prompts", unit="prompts", ...)
    describe("something/new")            # unknown: its raw key, no direction, 4 significant digits
    curve_panels({"loss": [...], "reward/mean": [...], "kl": [...]})  # -> [Panel("Reward (mean)", ...), ...]

Eval keys are those of align_jax.eval.suite.evaluate_model and the eval stage (align_jax.stages.evaluation);
a key of kind "count" or "timing" is not a metric: counts become the n= of the metrics that name them,
timings go to the report's run section. Training keys are what each stage logs to metrics.jsonl: the
loss and the loss function's metrics (losses/*.py), GRPO's rollout metrics (rollout.py), and eval_<key>
for the held-out evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

HIGHER, LOWER, NEITHER = 1, -1, 0
RATE, REWARD, PPL, NLL, COUNT, SECONDS = 3, 2, 2, 3, 0, 1  # decimals


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    direction: int = NEITHER
    decimals: int | None = None  # None: 4 significant digits
    count: str = ""  # the key that holds how many samples this metric was measured on
    unit: str = ""  # what that count counts
    kind: str = "metric"  # "metric" | "count" | "timing"
    detail: bool = False  # a breakdown (per check, per category): its own table, no chart

    @property
    def hint(self) -> str:
        return {HIGHER: "higher is better", LOWER: "lower is better"}.get(self.direction, "")

    @property
    def arrow(self) -> str:
        return {HIGHER: "↑", LOWER: "↓"}.get(self.direction, "")

    @property
    def label(self) -> str:
        return f"{self.name} {self.arrow}".rstrip()

    def format(self, value: float) -> str:
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if self.decimals is None:
            return f"{value:.4g}"
        return f"{value:,.0f}" if self.kind == "count" else f"{value:.{self.decimals}f}"


def _m(key, name, direction=NEITHER, decimals=None, count="", unit="", **kw) -> Metric:
    return Metric(key, name, direction, decimals, count, unit, **kw)


# In the order the report lists them: headline numbers first.
_KNOWN = [
    _m(
        "constraints/prompt_acc", "Constraint following, prompt level", HIGHER, RATE, "constraints/n_prompts", "prompts"
    ),
    _m(
        "constraints/instruction_acc",
        "Constraint following, instruction level",
        HIGHER,
        RATE,
        "constraints/n_instructions",
        "checks",
    ),
    _m("ifeval/prompt_strict", "IFEval, prompt level, strict", HIGHER, RATE, "ifeval/n_prompts", "prompts"),
    _m(
        "ifeval/inst_strict", "IFEval, instruction level, strict", HIGHER, RATE, "ifeval/n_instructions", "instructions"
    ),
    _m("ifeval/prompt_loose", "IFEval, prompt level, loose", HIGHER, RATE, "ifeval/n_prompts", "prompts"),
    _m("ifeval/inst_loose", "IFEval, instruction level, loose", HIGHER, RATE, "ifeval/n_instructions", "instructions"),
    _m("reward/mean", "Mean RM reward of greedy responses", HIGHER, REWARD, "reward/n", "prompts"),
    _m("reward/std", "Std of RM rewards of greedy responses", NEITHER, REWARD, "reward/n", "prompts"),
    _m("winrate/vs_reference", "Win rate vs the reference model (RM)", HIGHER, RATE, "reward/n", "prompts"),
    _m("winrate/margin", "Mean reward margin over the reference", HIGHER, REWARD, "reward/n", "prompts"),
    _m("reward/reference_mean", "Mean RM reward of the reference model", NEITHER, REWARD, "reward/n", "prompts"),
    _m("ppl", "Perplexity on held-out SFT chats", LOWER, PPL, "ppl/tokens", "tokens"),
    _m("nll", "NLL per token on held-out SFT chats", LOWER, NLL, "ppl/tokens", "tokens"),
    _m("token_acc", "Next-token accuracy on held-out SFT chats", HIGHER, RATE, "ppl/tokens", "tokens"),
    _m(
        "pas/prompt_acc",
        "Constraint following with PAS prompts, prompt level",
        HIGHER,
        RATE,
        "pas/n_prompts",
        "prompts",
    ),
    _m(
        "pas/instruction_acc",
        "Constraint following with PAS prompts, instruction level",
        HIGHER,
        RATE,
        "pas/n_instructions",
        "checks",
    ),
    _m("rm/accuracy", "Reward model pair accuracy (held-out)", HIGHER, RATE, "rm/pairs", "pairs"),
    _m("eval_seconds", "Evaluation time (s)", decimals=SECONDS, kind="timing"),
]
_COUNTS = {
    "constraints/n_prompts": "Constraint prompts",
    "constraints/n_instructions": "Constraint checks",
    "ifeval/n_prompts": "IFEval prompts",
    "ifeval/n_instructions": "IFEval instructions",
    "pas/n_prompts": "PAS constraint prompts",
    "pas/n_instructions": "PAS constraint checks",
    "reward/n": "Reward prompts",
    "ppl/tokens": "Held-out SFT tokens",
    "rm/pairs": "Held-out preference pairs",
}
KNOWN: dict[str, Metric] = {m.key: m for m in _KNOWN}
KNOWN.update({k: _m(k, name, decimals=COUNT, kind="count") for k, name in _COUNTS.items()})
# Breakdowns, named by the key's last part: (prefix, name template, the key they are listed after).
_PATTERNS = [
    ("constraints/check/", "Check “{}” pass rate", "constraints/instruction_acc"),
    ("constraints/category/", "Category “{}”, prompt level", "constraints/prompt_acc"),
    ("ifeval/strict/", "IFEval “{}”, strict", "ifeval/inst_strict"),
    ("ifeval/loose/", "IFEval “{}”, loose", "ifeval/inst_loose"),
]
_RANK = {k: i for i, k in enumerate(KNOWN)}


def describe(key: str) -> Metric:
    """What `key` is; an unknown key keeps its raw name and is classed by its shape (a last part "n" or
    "n_*" is a count, a "*_seconds" or "time/*" key a timing)."""
    if key in KNOWN:
        return KNOWN[key]
    for prefix, template, _ in _PATTERNS:
        if key.startswith(prefix) and len(key) > len(prefix):
            return _m(key, template.format(key[len(prefix) :]), HIGHER, RATE, detail=True)
    last = key.rsplit("/", 1)[-1]
    if last == "n" or last.startswith("n_"):
        return _m(key, key, decimals=COUNT, kind="count")
    if key.endswith("_seconds") or key.startswith("time/"):
        return _m(key, key, kind="timing")
    return _m(key, key)


def metric_order(keys: Sequence[str]) -> list[str]:
    """Known keys in the registry's order (a breakdown right after its parent), then unknown keys in the order
    given (the suite's own order)."""

    def rank(item: tuple[int, str]) -> tuple[float, int]:
        i, key = item
        for prefix, _, parent in _PATTERNS:
            if key.startswith(prefix):
                return _RANK[parent] + 0.5, i
        return _RANK.get(key, len(_RANK)), i

    return [k for _, k in sorted(enumerate(dict.fromkeys(keys)), key=rank)]


def as_json(metric: Metric) -> dict:
    """The metadata report.json keeps beside each raw key."""
    direction = {HIGHER: "higher", LOWER: "lower"}.get(metric.direction)
    return {"name": metric.name, "direction": direction, "kind": metric.kind, "count": metric.count or None}


# Training curves ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    direction: int = NEITHER
    series: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (logged key, legend label)

    @property
    def hint(self) -> str:
        return {HIGHER: "higher is better", LOWER: "lower is better"}.get(self.direction, "")


# Constant eval keys that count what was evaluated: never a curve.
EVAL_COUNTS = ("eval_tokens", "eval_pairs", "eval_weight")
MAX_PANELS = 9


def _pair(key: str, train: str = "train", held_out: str = "eval") -> tuple[tuple[str, str], ...]:
    return ((key, train), (f"eval_{key}", held_out))


def _loss(direction: int = LOWER, title: str = "Loss") -> Panel:
    return Panel(title, "loss", direction, _pair("loss"))


def stage_kind(keys: Sequence[str] | set[str]) -> str:
    """ "preference" (DPO family: TRL's rewards/*), "rl" (GRPO/PPO rollouts), "reward_model" (pair accuracy and
    margin) or "lm" (SFT, PAS), from the keys a stage logged."""
    keys = set(keys)
    if any(k.startswith(("rewards/", "eval_rewards/")) for k in keys):
        return "preference"
    if keys & {"reward/mean", "response_length", "eval_reward", "eval_response_length"}:
        return "rl"
    if keys & {"margin", "eval_margin"}:
        return "reward_model"
    return "lm"


def _kind_panels(kind: str, keys: set[str]) -> list[Panel]:
    if kind == "rl":
        parts = sorted(k for k in keys if k.startswith("reward/") and k not in ("reward/mean", "reward/std"))
        eval_parts = sorted(k for k in keys if k.startswith("eval_reward/"))
        return [
            Panel(
                "Reward (mean)", "mean reward", HIGHER, (("reward/mean", "rollouts"), ("eval_reward", "eval, greedy"))
            ),
            Panel(
                "Reward components",
                "reward",
                HIGHER,
                tuple((k, k.split("/", 1)[1]) for k in parts)
                + tuple((k, k.split("/", 1)[1] + ", eval") for k in eval_parts),
            ),
            Panel(
                "KL to the reference", "KL per token (nats)", NEITHER, (("kl", "rollouts"), ("kl_loss", "KL loss term"))
            ),
            Panel(
                "Response length",
                "tokens per response",
                NEITHER,
                (("response_length", "rollouts"), ("eval_response_length", "eval, greedy")),
            ),
            _loss(NEITHER, "Policy loss (surrogate)"),
        ]
    if kind == "preference":
        return [
            Panel("Reward margin (chosen − rejected)", "implicit reward margin", HIGHER, _pair("rewards/margins")),
            Panel("Preference accuracy", "accuracy (chosen > rejected)", HIGHER, _pair("rewards/accuracies")),
            _loss(),
            Panel(
                "Chosen and rejected rewards",
                "implicit reward",
                NEITHER,
                (
                    *_pair("rewards/chosen", "chosen", "chosen, eval"),
                    *_pair("rewards/rejected", "rejected", "rejected, eval"),
                ),
            ),
        ]
    if kind == "reward_model":
        return [
            Panel("Pair accuracy", "accuracy (pairs ranked right)", HIGHER, _pair("accuracy")),
            Panel("Reward margin", "reward(chosen) − reward(rejected)", HIGHER, _pair("margin")),
            _loss(),
        ]
    return [_loss(), Panel("Next-token accuracy", "token accuracy", HIGHER, _pair("accuracy"))]


def curve_panels(history: Mapping[str, Sequence[tuple[float, float]]]) -> list[Panel]:
    """The panels of one stage's training curves, from the keys it logged (key -> (step, value) points):
    what its kind of stage optimises first (stage_kind), each panel with only the series that were logged;
    then one panel per other eval_* key that changed. The loss panel is always there, empty if need be."""
    keys = set(history)
    out = []
    for panel in _kind_panels(stage_kind(keys), keys):
        series = tuple(s for s in panel.series if s[0] in keys)
        if series or panel.ylabel == "loss":
            out.append(Panel(panel.title, panel.ylabel, panel.direction, series))
    shown = {k for p in out for k, _ in p.series}
    for key, points in history.items():
        if key.startswith("eval_") and key not in shown and key not in EVAL_COUNTS and len({v for _, v in points}) > 1:
            out.append(Panel(key, key, NEITHER, ((key, "eval"),)))
    return out[:MAX_PANELS]
