"""On PYTHONPATH, makes this interpreter see only what `pip install .` installs (no extras): an import
of a package that only the test extras (or nothing of modelmake's) would install fails as it would
on a user's machine after README command 1."""

import re
import sys
from importlib import abc, metadata

from packaging.requirements import Requirement


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "modelmake") -> set[str]:
    """Every distribution `root`'s runtime requirements (no extras) pull in, transitively."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(_key(name))
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


class _OnlyRuntime(abc.MetaPathFinder):
    def __init__(self):
        allowed = runtime_closure()
        self.refused = {module for module, dists in metadata.packages_distributions().items()
                        if not any(_key(d) in allowed for d in dists)}

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.refused:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not a runtime dependency of modelmake)",
                                      name=fullname)
        return None


sys.meta_path.insert(0, _OnlyRuntime())
