"""The package layout's promises: a torch-free data layer and a stable public API."""

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_data_layer_imports_without_torch():
    # Blocked modules raise ImportError on import: any torch, timm or Flower import fails it.
    r = _run("import sys; sys.modules['torch'] = sys.modules['timm'] = sys.modules['flwr'] = None\n"
             "import ark_core, ark_core.data, ark_core.config, ark_core.tasks\n"
             "print('chestxray14' in ark_core.data.ADAPTERS)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_public_api_loads_on_first_use():
    r = _run("import sys, ark_core\n"
             "assert 'torch' not in sys.modules\n"
             "from ark_core import ArkModel, create_model, load_model, make_teacher, ema_update\n"
             "assert 'torch' in sys.modules\n"
             "assert ark_core.create_model is create_model\n"
             "print(ArkModel.__module__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ark_core.model.network"


def test_unknown_attribute_is_an_attribute_error():
    import ark_core

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ark_core.nope  # noqa: B018
