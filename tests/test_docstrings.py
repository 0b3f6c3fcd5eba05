"""Every public function and class of the package has a docstring (the project's standard: every public
function is documented)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import blt_decode
import blt_decode.backends
import blt_decode.strategies
from blt_decode.errors import MissingExtraError

#: programs that run on import: the command line, and the sandbox's guard (run as a script in the child)
PROGRAMS = ("blt_decode.__main__", "blt_decode.cli.__main__", "blt_decode.evaluation._guard")


def module_names() -> list[str]:
    """blt_decode and every module under it, the strategies/ and backends/ folders (mapped in) included."""
    names = {"blt_decode"}
    for package in (blt_decode, blt_decode.strategies, blt_decode.backends):
        names.add(package.__name__)
        names.update(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
    return sorted(names.difference(PROGRAMS))


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for name in module_names():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an optional extra that is not installed; blt_decode's own must import
            if (exc.name or "").partition(".")[0] == "blt_decode":
                raise
            continue
        except MissingExtraError:  # the same, said by the module itself
            continue
        for attr, obj in vars(module).items():
            if (not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and obj.__module__ == name and not (obj.__doc__ or "").strip()):
                missing.append(f"{name}.{attr}")
    assert not missing, "public functions and classes without a docstring:\n" + "\n".join(missing)
