"""Run options: the one list of every option of a run, with type, range and help.

:class:`RunOptions` is the single source of truth. Comparison files (top level and
each ``[[optimizer]]`` table), the command-line flags of ``curvbench run`` and
``curvbench compare`` and the keyword arguments of :func:`runner.run.run` are all
derived from its fields, so a new option is one field here. Every value is checked
when the options are built (types, ranges, and the rules that tie options together),
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from tasks.hparams import ConfigError, HParam, Range, coerce, declared_hparams

#: Largest step count: global step indices are int32 inside the compiled program.
MAX_STEPS = 10**9
#: Most seeds in one run (all seeds of a run are vmapped in one program).
MAX_SEEDS = 4096
#: Most sequences of one evaluation (or one curvature minibatch).
MAX_SEQUENCES = 10**6
#: Most parameters recorded per step with ``record_params``.
MAX_RECORDED_PARAMS = 64

Steps = Annotated[int, Range(1, MAX_STEPS)]
Sequences = Annotated[int, Range(1, MAX_SEQUENCES)]


def _option(default: Any, help: str, changes_results: bool = True) -> Any:
    """A field with its help text; ``changes_results=False`` for options that only
    decide what is saved (they stay out of the run's configuration and id)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "changes_results": changes_results}
    )


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How one configuration is trained, evaluated, probed and recorded."""

    seeds: tuple[int, ...] = _option(
        5, "number of seeds (0..n-1) or a list of distinct non-negative seeds"
    )
    steps: Steps = _option(1000, "maximum updates per seed")
    work_budget: Annotated[float, Range(0, 1e18, low_open=True)] | None = _option(
        None,
        "retire a seed once its work reaches this many gradient-equivalents "
        "(checked after each chunk of eval_every steps): an equal budget for every "
        "optimizer",
    )
    target_loss: Annotated[float, Range(-1e30, 1e30)] | None = _option(
        None,
        "time-to-target: the run file records the updates, gradient-equivalents and "
        "seconds until the evaluation loss first fell to this value",
        False,
    )
    early_stopping: Annotated[int, Range(1, MAX_STEPS)] | None = _option(
        None,
        "retire a seed after this many evaluations without a new best evaluation "
        "(validation) loss; its best evaluation is what tables report",
    )
    eval_every: Steps = _option(
        100, "steps per compiled chunk; evaluation and success test follow each"
    )
    eval_size: Sequences = _option(1000, "fresh sequences per evaluation")
    curvature_batch_size: Sequences | None = _option(
        None, "curvature minibatch handed to the optimizer each step (default: batch)"
    )
    checkpoint_every: Steps | None = _option(
        None,
        "save parameters every N steps (a multiple of eval_every), and the whole "
        "training state for resuming",
        False,
    )
    resume_every_seconds: Annotated[float, Range(0, 1e9)] | None = _option(
        300.0,
        "save the whole training state after the chunk that ends this many seconds "
        "after the last save, so a killed run resumes there (also at every "
        "checkpoint_every; unset: only there)",
        False,
    )
    record_steps: bool = _option(True, "keep per-step traces (<run>.steps.npz)", False)
    probe_every: Steps | None = _option(
        None, "curvature probes at step 0 and every N steps (a multiple of eval_every)"
    )
    probe_events: Annotated[int, Range(0, 1000)] = _option(
        2, "with probe_every: also probe this many explosions per seed and interval"
    )
    explosion_factor: Annotated[float, Range(1, 1e30, low_open=True)] = _option(
        5.0, "a step explodes when its gradient norm exceeds this x the running mean"
    )
    lanczos_iters: Annotated[int, Range(2, 1000)] = _option(
        20, "Hessian-vector products per probe's Lanczos run"
    )
    record_params: bool = _option(
        False, f"trace every parameter (models of at most {MAX_RECORDED_PARAMS})"
    )

    def __post_init__(self) -> None:
        for name, hp in option_specs().items():
            if name == "seeds":
                value = _seeds(self.seeds)
            else:
                value = coerce("run option", hp, getattr(self, name))
            object.__setattr__(self, name, value)
        for name in ("checkpoint_every", "probe_every"):
            value = getattr(self, name)
            if value is not None and value % self.eval_every:
                raise ConfigError(
                    f"run option {name!r} = {value} must be a multiple of "
                    f"'eval_every' = {self.eval_every}"
                )

    @classmethod
    def from_dict(cls, values: dict, where: str = "run options") -> RunOptions:
        """Build from a mapping, rejecting unknown names (listing the valid ones)."""
        unknown = sorted(set(values) - set(option_specs()))
        if unknown:
            raise ConfigError(
                f"unknown {where} {unknown[0]!r}; valid: {', '.join(option_specs())}"
            )
        return cls(**values)

    def as_dict(self) -> dict:
        """The options as plain values (seeds as a list)."""
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        return out

    def identity(self) -> dict:
        """The options that change results: part of the run's configuration and id."""
        values = self.as_dict()
        return {
            f.name: values[f.name]
            for f in dataclasses.fields(self)
            if f.metadata["changes_results"]
        }


def option_specs() -> dict[str, HParam]:
    """Every run option: name, type, range and default (in declaration order)."""
    return _SPECS


def option_help(name: str) -> str:
    """The help text of a run option."""
    return _HELP[name]


def _seeds(value: Any) -> tuple[int, ...]:
    field = "run option 'seeds'"
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        raise ConfigError(
            f"{field} = {value!r} must be a number of seeds or a list of seeds"
        )
    if isinstance(value, int):
        if not 1 <= value <= MAX_SEEDS:
            raise ConfigError(f"{field} = {value} must be in [1, {MAX_SEEDS}]")
        return tuple(range(value))
    if not value:
        raise ConfigError(f"{field} must name at least one seed")
    if len(value) > MAX_SEEDS:
        raise ConfigError(f"{field} lists {len(value)} seeds; at most {MAX_SEEDS}")
    for seed in value:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ConfigError(
                f"{field}: {seed!r} is not a seed (an integer in [0, 2^31))"
            )
    if len(set(value)) != len(value):
        raise ConfigError(f"{field} must be distinct, got {list(value)}")
    return tuple(value)


_SPECS = {
    name: hp for name, hp in declared_hparams(RunOptions).items() if name != "self"
}
_SPECS["seeds"] = _SPECS["seeds"]._replace(kind=Any)
_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(RunOptions)}
