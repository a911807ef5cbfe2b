"""On PYTHONPATH, makes this interpreter see only what `pip install .` installs (no extras): an import
of a package that only the test extras (or nothing of modelmake's) would install fails as it would
on a user's machine after README command 1."""

import re
import sys
from importlib import metadata

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


def refused_modules() -> set[str]:
    """The top-level modules installed here that no runtime dependency of modelmake brings."""
    allowed = runtime_closure()
    return {module for module, dists in metadata.packages_distributions().items()
            if not any(_key(d) in allowed for d in dists)}


# None in sys.modules is how Python itself marks a module as absent: `import tensorboard` raises
# ModuleNotFoundError and importlib.util.find_spec("tensorboard") returns None, as where it is not
# installed (libraries such as accelerate probe optional packages with find_spec).
for _module in refused_modules():
    sys.modules.setdefault(_module, None)
