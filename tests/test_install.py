"""Installing patchscope must not claim the top-level import name `kernels` (HuggingFace's package)."""

import json
import subprocess
import sys


def test_kernels_folder_installs_under_patchscope(tmp_path):
    probe = (
        "import importlib.util, importlib.metadata, json\n"
        "import patchscope.kernels as ours\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "try:\n    dist = importlib.metadata.version('kernels')\nexcept importlib.metadata.PackageNotFoundError:\n    dist = None\n"
        "from transformers.utils import import_utils\n"
        "print(json.dumps({'ours': ours.__file__, 'spec': spec.origin if spec else None, 'dist': dist,"
        " 'probe': import_utils.is_kernels_available()}))\n"
    )
    # a neutral working directory, so the repository root is not on sys.path
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["ours"].endswith("kernels/__init__.py")
    if found["dist"] is None:  # HF kernels not installed: nothing named `kernels` may be importable
        assert found["spec"] is None
        assert found["probe"] is False
    else:  # installed: `import kernels` must be theirs
        assert "site-packages" in found["spec"] and found["spec"] != found["ours"]
