"""The engine tests' shared set-up.

Importing torch's compiler (transformers and vLLM do, on import) makes its cache folder ``torchinductor_<user>``
in TMPDIR. tests/conftest.py reports anything left in the session's TMPDIR except pytest's own folders, so
the cache goes into one of those (removed with the session's TMPDIR). Set before any test module imports torch.
"""
from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}" / "torchinductor"))
