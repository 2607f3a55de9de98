"""Gymnasium ids as ``env.gym_id`` writes them: import whatever registers the id, or say what to write.

Three forms:

* ``module:Name-v0``: ``module`` is imported first (its import registers the id), as gymnasium's
  own ``gym.make("module:Name-v0")`` does.
* ``Namespace/Name``: when the namespace is not registered yet, the module that registers it is
  imported: a known one (``Meta-World`` -> ``metaworld``), else the namespace lower-cased without
  ``-`` and ``_`` (``My-Suite`` -> ``mysuite``). If no such module exists, the error says which
  ``module:`` prefix to write.
* ``Name-v0``: registered already (gymnasium's own envs, this suite's ``vla_ft/...`` ids).

Every evaluation worker resolves the id this way before ``gym.make`` (vla_ft/sim/env_types.py), so
an id that resolves in the check before training resolves in every worker. No torch here.
"""

from __future__ import annotations

import difflib
import importlib

from vla_ft.errors import EnvError

# gymnasium namespaces whose registering module is not the namespace's own name, lower-cased
GYM_NAMESPACES = {"Meta-World": "metaworld", "ALE": "ale_py", "MiniGrid": "minigrid", "BabyAI": "minigrid"}
# the pip extra (pyproject.toml) that installs a namespace's module, where this project has one
EXTRAS = {"metaworld": "metaworld"}


def namespace_module(namespace: str) -> str:
    """The module whose import registers gymnasium ``namespace`` (known, else guessed)."""
    return GYM_NAMESPACES.get(namespace) or namespace.lower().replace("-", "").replace("_", "")


def _install_hint(module: str) -> str:
    extra = EXTRAS.get(module.split(".")[0])
    return f"pip install -e '.[{extra}]'" if extra else f"install the package that provides {module!r}"


def _import(gym_id: str, module: str, namespace: str | None = None) -> None:
    """Import ``module`` (for ``namespace``: the module guessed to register it); a failure is one line
    (a missing package with its install command, or the error its import raised)."""
    role = f"it registers the {namespace} namespace" if namespace else "the id's module: prefix"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        if namespace and namespace not in GYM_NAMESPACES and missing == module:
            raise EnvError(  # a guess from the namespace's name that led nowhere: ask for the module
                f"env.gym_id={gym_id!r}: gymnasium namespace {namespace!r} is not registered and no module "
                f"{module!r} registers it; write env.gym_id=<module>:{gym_id} with the module whose import "
                f"registers it (it is imported first, in every evaluation worker too)"
            ) from exc
        # the package itself is missing, or one it imports (then that one is what to install)
        package = module if missing.split(".")[0] == module.split(".")[0] else missing
        raise EnvError(
            f"env.gym_id={gym_id!r}: module {module!r} ({role}) cannot be imported (no module named "
            f"{missing!r}); {_install_hint(package)}"
        ) from exc
    except Exception as exc:  # the package is there but its import fails (e.g. a version clash)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise EnvError(
            f"env.gym_id={gym_id!r}: importing module {module!r} ({role}) failed ({reason}); fix or "
            f"reinstall that package ({_install_hint(module)})"
        ) from exc


def resolve_gym_id(gym_id: str) -> str:
    """Import what registers ``gym_id`` and return the id to pass to ``gymnasium.make``.

    Raises:
        EnvError: one line: the module cannot be imported (with the install command), the namespace
            has no module (with the ``module:`` prefix to write), or the id is not registered (with
            the closest registered ids).
    """
    import gymnasium as gym

    module, _, env_id = gym_id.rpartition(":")
    if module:
        _import(gym_id, module)
    namespace = env_id.split("/")[0] if "/" in env_id else None
    if not module and namespace is not None and not _namespace_registered(namespace):
        _import(gym_id, namespace_module(namespace), namespace)
    try:
        gym.spec(env_id)
    except gym.error.Error as exc:
        reason = str(exc).splitlines()[0].rstrip(".")
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        if "did you mean" in reason.lower():  # gymnasium names the closest id itself
            hint = "check the id"
        elif close:
            hint = f"did you mean {', '.join(repr(c) for c in close)}?"
        elif module:
            hint = f"check the id: importing {module!r} did not register it"
        else:
            hint = "check the id, or prefix it with the module that registers it (module:Id-v0)"
        raise EnvError(f"env.gym_id={gym_id!r}: {reason}; {hint}") from exc
    return env_id


def _namespace_registered(namespace: str) -> bool:
    import gymnasium as gym

    return any(spec.namespace == namespace for spec in gym.registry.values())
