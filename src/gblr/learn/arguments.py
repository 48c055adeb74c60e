"""The structure learner's keyword arguments that need no model: the budget (exactly one
of ``budget``, ``budget_macs`` and ``lam``) and the deprecated keywords, for
[`gblr.StructureLearner`][] and the training callbacks, which check what they are given
when they are made and build the learner later.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ..cost import check_fraction_budget
from .config import DEPRECATED_OPTIONS, LearnerConfig, config_from_options, deprecation_text

__all__ = ["BUDGET_ALIASES", "budget_names", "check_budget_arguments", "resolve_deprecated"]

# Deprecated budget keywords (before the library called a fraction of MACs ``budget``
# everywhere) and their replacements.
BUDGET_ALIASES = {"target": "budget", "target_macs": "budget_macs"}


def resolve_deprecated(
    config: LearnerConfig | None,
    arguments: Mapping[str, Any],
    *,
    caller: str = "StructureLearner",
    stacklevel: int = 3,
) -> tuple[LearnerConfig | None, dict[str, Any]]:
    """The config and keyword arguments that ``caller``'s deprecated keywords mean, with
    one ``FutureWarning`` naming the replacement of each.

    The options of [`DEPRECATED_OPTIONS`][gblr.learn.config.DEPRECATED_OPTIONS] become a
    [`gblr.LearnerConfig`][] (checked under their old names; a ``ValueError`` when
    ``config`` is given too), ``target``/``target_macs`` become ``budget``/``budget_macs``
    (a ``ValueError`` when both names of one are given). Other keys pass through.

    Returns:
        ``(config, arguments)``: ``config`` unchanged when no option was given.

    Examples:
        >>> import warnings
        >>> from gblr.learn.arguments import resolve_deprecated
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     config, rest = resolve_deprecated(None, {"merge": 1e-3, "target": 0.3})
        >>> config.merge, rest
        (MergeConfig(tolerance=0.001), {'budget': 0.3})
        >>> [str(w.message).split(" is ")[0] for w in caught]
        ['StructureLearner(merge=...)', 'StructureLearner(target=...)']
    """
    options = {key: value for key, value in arguments.items() if key in DEPRECATED_OPTIONS}
    rest = {key: value for key, value in arguments.items() if key not in DEPRECATED_OPTIONS}
    if options:
        if config is not None:
            raise ValueError(
                f"give either config= or the deprecated {caller} keywords {sorted(options)}, "
                f"not both: {deprecation_text(caller, options).split('; ')[1]}"
            )
        warnings.warn(deprecation_text(caller, options), FutureWarning, stacklevel=stacklevel)
        config = config_from_options(options)
    _check_aliases(rest)
    for old, new in BUDGET_ALIASES.items():
        if old not in rest:
            continue
        value = rest.pop(old)
        if value is not None:
            rest[new] = value
        warnings.warn(
            f"{caller}({old}=...) is deprecated since gblr 0.2 and will be removed in 0.3; "
            f"use {new}=... (the library's name for a MACs budget, as in gblr.convert)",
            FutureWarning,
            stacklevel=stacklevel,
        )
    return config, rest


def check_budget_arguments(arguments: Mapping[str, Any]) -> None:
    """The budget checks that need no model: exactly one of ``budget``, ``budget_macs``
    and ``lam`` (or the deprecated ``target``, ``target_macs``, named as given), and a
    budget of the right type and range ([`gblr.cost.check_fraction_budget`][]).

    Examples:
        >>> from gblr.learn.arguments import check_budget_arguments
        >>> check_budget_arguments({"budget": 0.3})
        >>> check_budget_arguments({"budget": 0.3, "lam": 0.1})
        Traceback (most recent call last):
        ...
        ValueError: give exactly one of budget (budget mode, a fraction of the dense MACs), ...
    """
    _check_aliases(arguments)
    fraction_name, macs_name = budget_names(arguments)
    given = [name for name in (fraction_name, macs_name, "lam") if arguments.get(name) is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of {fraction_name} (budget mode, a fraction of the dense MACs), "
            f"{macs_name} (budget mode, a MAC count) and lam (λ mode), got {given or 'none'}"
        )
    if given[0] != "lam":
        check_fraction_budget(
            arguments.get(fraction_name),
            arguments.get(macs_name),
            fraction_name=fraction_name,
            macs_name=macs_name,
        )


def _check_aliases(arguments: Mapping[str, Any]) -> None:
    for old, new in BUDGET_ALIASES.items():
        if arguments.get(old) is not None and arguments.get(new) is not None:
            raise ValueError(
                f"give {new} or its deprecated alias {old}, not both, got "
                f"{new}={arguments[new]!r} and {old}={arguments[old]!r}"
            )


def budget_names(arguments: Mapping[str, Any]) -> tuple[str, str]:
    """The names the caller used for the fraction and the count (``budget``,
    ``budget_macs``, or their deprecated aliases), for errors.

    Examples:
        >>> from gblr.learn.arguments import budget_names
        >>> budget_names({"target": 0.3}), budget_names({"budget_macs": 100})
        (('target', 'budget_macs'), ('budget', 'budget_macs'))
    """
    fraction = "target" if arguments.get("target") is not None else "budget"
    macs = "target_macs" if arguments.get("target_macs") is not None else "budget_macs"
    return fraction, macs
