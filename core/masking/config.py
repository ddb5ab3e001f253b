"""The one mask vocabulary: `MaskConfig` (which tokens leave the loss), the training methods
that name its modes, and the `mask` command's config.

Every place that takes a mask setting declares it from `MaskConfig`'s fields (default, help,
choices; `core.config.field_from`): `TrainConfig` holds them flat under the names its
`config.json` has always had (`method`, `tau`, `target_share`, `k_percent`, `percentile_rule`,
`mask_seed`), `MaskCommandConfig` (`python -m core mask`) holds them as they are, and the
Masking studio builds a `MaskConfig` and shows its `MaskCommandConfig.command()`.

No numpy ranking or pandas here (that is `core.masking.rules`), so the command line's parser
imports this cheaply.
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from core.config import JobConfig, field_default, field_from, help_meta
from core.errors import LensError
from core.masking import DEFAULT_TAU

#: the mask modes `core.masking.rules.compute_masks` applies
MODES = ("high", "low", "random", "percentile")
PERCENTILE_RULES = ("top", "random", "bottom")
DEFAULT_K_PERCENT = 20.0

#: the training methods (`TrainConfig.method`, the runs tables, the protocol's arms) and the
#: mask mode each trains with; gt trains every response token (no mask)
METHOD_MODES: dict[str, str | None] = {
    "gt": None,
    "stm": "high",
    "random": "random",
    "low": "low",
    "percentile": "percentile",
}
METHODS = tuple(METHOD_MODES)

MODE_HELP = (
    "which response tokens leave the loss: high (STM) masks tokens with perplexity > tau; low "
    "masks those with perplexity < tau; random masks, per example, as many tokens as high "
    "would, at random positions (a control); percentile masks k%% of every example's response "
    "tokens (--percentile-rule, --k-percent)"
)
METHOD_HELP = (
    "the mask: gt trains every response token; stm masks tokens with perplexity > tau (mode "
    "high); random masks as many as stm would, at random positions (a control); low masks "
    "those with perplexity < tau; percentile masks k%% of every example's response tokens"
)


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class MaskConfig:
    """Which tokens to mask.

    ``tau`` and ``target_share`` are alternatives for modes high/low/random: give exactly one
    (``tau`` defaults to 2.5, so pass ``tau=None`` together with ``target_share``). Mode
    ``percentile`` uses ``percentile_rule`` and ``k_percent`` and ignores ``tau``; it rejects a
    ``target_share``. ``seed`` drives modes random and percentile/random only.
    """

    mode: str = field(default="high", metadata=help_meta(MODE_HELP, choices=MODES))
    tau: float | None = field(
        default=DEFAULT_TAU,
        metadata=help_meta(
            f"token-perplexity threshold tau of the masks that threshold on it (high = stm, "
            f"low, random; default {DEFAULT_TAU:g})"
        ),
    )
    target_share: float | None = field(
        default=None,
        metadata=help_meta(
            "instead of tau: the share of all response tokens to mask (0-1); tau is solved for it"
        ),
    )
    percentile_rule: str = field(
        default="top",
        metadata=help_meta(
            "percentile: which k%%: top (highest perplexity), random or bottom (lowest)",
            choices=PERCENTILE_RULES,
        ),
    )
    k_percent: float = field(
        default=DEFAULT_K_PERCENT,
        metadata=help_meta(
            f"percentile: k, the percent of every example's response tokens masked (default "
            f"{DEFAULT_K_PERCENT:g})"
        ),
    )
    seed: int = field(
        default=0, metadata=help_meta("seed of random masks (random, percentile random)")
    )

    def __post_init__(self) -> None:
        self._validate()
        # normalise numpy scalars etc. to plain Python numbers (JSON-safe, hashable)
        if self.tau is not None:
            object.__setattr__(self, "tau", float(self.tau))
        if self.target_share is not None:
            object.__setattr__(self, "target_share", float(self.target_share))
        object.__setattr__(self, "k_percent", float(self.k_percent))
        object.__setattr__(self, "seed", int(self.seed))

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise LensError(f"unknown mask mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.tau is not None:
            if not is_number(self.tau):
                raise LensError(f"tau must be a number, got {self.tau!r}")
            if not math.isfinite(self.tau) or self.tau <= 0:
                raise LensError(f"tau must be a finite number > 0, got {self.tau!r}")
        if self.target_share is not None:
            share = self.target_share
            if not is_number(share):
                raise LensError(f"target share must be a number, got {share!r}")
            if not (0.0 <= share <= 1.0):
                raise LensError(f"target share must be between 0 and 1, got {share!r}")
        if self.percentile_rule not in PERCENTILE_RULES:
            raise LensError(
                f"unknown percentile rule {self.percentile_rule!r}; "
                f"choose one of {', '.join(PERCENTILE_RULES)}"
            )
        k = self.k_percent
        if not is_number(k) or not (0.0 <= k <= 100.0):
            raise LensError(f"k_percent must be between 0 and 100, got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise LensError(f"seed must be an integer, got {self.seed!r}")
        if self.seed < 0:
            raise LensError(f"seed must be >= 0, got {self.seed}")
        if self.mode == "percentile":
            if self.target_share is not None:
                raise LensError("target share does not apply to mode percentile; use k_percent")
        else:
            if self.tau is not None and self.target_share is not None:
                raise LensError("give either tau or target share, not both (set tau=None)")
            if self.tau is None and self.target_share is None:
                raise LensError(f"mode {self.mode} needs a tau or a target share")

    @property
    def uses_tau(self) -> bool:
        """True for the modes that threshold on perplexity (high, low, random)."""
        return self.mode != "percentile"

    @property
    def uses_seed(self) -> bool:
        """True for the masks the seed draws: mode random and percentile random."""
        return self.mode == "random" or (
            self.mode == "percentile" and self.percentile_rule == "random"
        )

    def describe(self) -> str:
        """Short human-readable label, e.g. 'high, tau=2.5' or 'percentile top 20%'."""
        if self.mode == "percentile":
            return f"percentile {self.percentile_rule} {self.k_percent:g}%"
        if self.target_share is not None:
            return f"{self.mode}, target share={self.target_share:g}"
        return f"{self.mode}, tau={self.tau:g}"


@dataclass
class MaskCommandConfig(JobConfig):
    """``python -m core mask``: a scores file written by ``score`` -> a masked training set.

    The mask fields are `MaskConfig`'s. A setting that does not apply to the mode is kept at
    its default (tau for percentile; k and the rule for the others), so the command leaves it
    out; given as a flag, ``--tau``/``--share`` with percentile and ``--k-percent`` with
    another mode are one-line errors, as before. Left out, tau is 2.5 and k is 20.
    """

    COMMAND: ClassVar[str] = "mask"
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("tau", "target_share"),)
    ALWAYS: ClassVar[tuple[str, ...]] = ("scores", "mode", "out")
    LABEL: ClassVar[str] = "mask"

    scores: str = field(
        default="", metadata=help_meta("JSONL written by `score`", required=True, metavar="FILE")
    )
    mode: str = field_from(MaskConfig, "mode")
    tau: float | None = field_from(MaskConfig, "tau")
    target_share: float | None = field_from(MaskConfig, "target_share", aliases=("--share",))
    k_percent: float = field_from(MaskConfig, "k_percent")
    percentile_rule: str = field_from(MaskConfig, "percentile_rule")
    seed: int = field_from(MaskConfig, "seed")
    out: str = field(
        default="", metadata=help_meta("output folder", required=True, metavar="FOLDER")
    )
    overwrite: bool = field(default=False, metadata=help_meta("replace an existing output folder"))

    def __post_init__(self) -> None:
        for name, what in (("scores", "the scores JSONL"), ("out", "the output folder")):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise LensError(f"Give --{name}, {what}.")
        defaults = MaskConfig()
        if self.mode == "percentile":
            if self.target_share is not None:
                raise LensError("--tau/--share do not apply to --mode percentile; use --k-percent")
            self.tau = defaults.tau
        else:
            self.k_percent = defaults.k_percent
            self.percentile_rule = defaults.percentile_rule
        self.mask_config()  # a bad tau, share, k or seed: one line now

    @classmethod
    def from_mask(
        cls, mask: MaskConfig, *, scores: str, out: str, overwrite: bool = False
    ) -> MaskCommandConfig:
        """The command's config that applies `mask` to the scores file `scores`."""
        values = {f.name: getattr(mask, f.name) for f in fields(MaskConfig)}
        return cls(scores=scores, out=out, overwrite=overwrite, **values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MaskCommandConfig:
        """The flags as `JobConfig.from_args` reads them, less those the mode does not take."""
        given = vars(args)
        if given.get("mode") == "percentile" and ("tau" in given or "target_share" in given):
            raise LensError("--tau/--share do not apply to --mode percentile; use --k-percent")
        if given.get("mode", field_default(cls, "mode")) != "percentile" and "k_percent" in given:
            raise LensError("--k-percent only applies to --mode percentile")
        if given.get("tau") is not None and given.get("target_share") is not None:
            raise LensError("give either --tau or --share (--target-share), not both")
        return super().from_args(args)

    def mask_config(self) -> MaskConfig:
        """The `MaskConfig` the command applies."""
        return MaskConfig(
            mode=self.mode,
            tau=self.tau,
            target_share=self.target_share,
            percentile_rule=self.percentile_rule,
            k_percent=self.k_percent,
            seed=self.seed,
        )

    def command_values(self) -> dict[str, Any]:
        """`JobConfig.command_values`, plus tau (or k for percentile) at its default, so the
        command says where it masks."""
        values = super().command_values()
        if self.mode == "percentile":
            values["k_percent"] = self.k_percent
        elif self.target_share is None:
            values["tau"] = self.tau
        order = [f.name for f in self.cli_fields()]
        return {name: values[name] for name in order if name in values}
