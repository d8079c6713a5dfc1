"""The optimizer registry: a plain dict from name to factory, plus import paths.

A name that is not registered but contains a dot is imported: ``optax.adam`` or
``my_package.my_module:my_factory`` (a factory, or a ready ``GradientTransformation``).
Hyperparameters are checked against the factory's signature before anything compiles.

Hyperparameters annotated as plain ``float`` are *traced*: the runner passes them as
arguments of the compiled program, so sweeping a learning rate or a threshold reuses one
compilation. Such factories must not branch on those values in Python. Every other
hyperparameter (and every hyperparameter of an imported factory without ``float``
annotations) is static and part of the compilation key.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from optimizers import diagonal, first_order, quasi_newton
from optimizers.hessian_free import hessian_free
from tasks.hparams import ConfigError, check_hparams, declared_hparams
from tasks.plugins import resolve

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": first_order.sgd,
    "sgd_clip": first_order.sgd_clip,
    "sgd_cr": first_order.sgd_cr,
    "hf": hessian_free,
    "sdlm": diagonal.sdlm,
    "adahessian": diagonal.adahessian,
    "sophia_h": diagonal.sophia_h,
    "sophia_g": diagonal.sophia_g,
    "lbfgs": quasi_newton.lbfgs,
    "nonlinear_cg": quasi_newton.nonlinear_cg,
    "levenberg_marquardt": quasi_newton.levenberg_marquardt,
}


def register_optimizer(name: str, factory: Callable, overwrite: bool = False):
    """Register a user factory (returning an optax transformation) under ``name``."""
    if name in OPTIMIZERS and not overwrite:
        raise ConfigError(f"optimizer {name!r} is already registered")
    OPTIMIZERS[name] = factory
    return factory


def resolve_optimizer(name: str) -> Callable[..., optax.GradientTransformation]:
    """The factory registered as ``name``, or imported from the path ``name``."""
    obj = resolve("optimizer", OPTIMIZERS, name, "optax.adam")
    if isinstance(obj, optax.GradientTransformation):
        return lambda: obj
    if not callable(obj):
        raise ConfigError(
            f"optimizer {name!r} is neither a factory nor a transformation"
        )
    return obj


def check_optimizer(name: str, hparams: dict) -> dict:
    """Validate ``hparams`` for optimizer ``name``; return all of them with defaults."""
    return check_hparams("optimizer", name, resolve_optimizer(name), hparams)


def traced_names(name: str) -> tuple[str, ...]:
    """The hyperparameters of ``name`` that are passed as traced scalars."""
    declared = declared_hparams(resolve_optimizer(name))
    return tuple(
        n for n, hp in declared.items() if hp.kind is float and not hp.optional
    )


def make_optimizer(name: str, **hparams) -> optax.GradientTransformationExtraArgs:
    """Build optimizer ``name`` (validated), with extra-argument support."""
    factory = resolve_optimizer(name)
    kwargs = check_hparams("optimizer", name, factory, hparams)
    return optax.with_extra_args_support(factory(**kwargs))
