"""Write constraints.txt: the exact version of every installed package that hfllm[dev] depends on, directly or not.

Run after the test suite passed on a fresh `bash setup.sh dev` (or `HFLLM_LATEST=1 bash setup.sh dev`):
    python3 .ci/freeze_constraints.py > constraints.txt
setup.sh installs with this file by default, so a fresh machine gets what CI tested.
"""

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """Installed name -> version for `root[extras]` and everything it requires, for this interpreter's platform."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted_extras = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency for another platform
        key = canonical(dist.metadata["Name"])
        if key != canonical(root):
            if key in found and not wanted_extras:
                continue
            found[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            active = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (wanted_extras or {""})
            )
            if active:
                todo.append((requirement.name, set(requirement.extras)))
    return found


if __name__ == "__main__":
    pins = closure("hfllm", {"dev", "eval", "qlora"})
    print("# Exact versions the test suite passed on (written by .ci/freeze_constraints.py; see setup.sh).")
    for name, version in sorted(pins.items()):
        print(f"{name}=={version.split('+')[0]}")
