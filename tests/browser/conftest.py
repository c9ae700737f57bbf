"""The real-browser tests need Debian's chromium and playwright; ``bash tests/browser/run.sh`` installs
both and runs them. A plain ``python -m pytest`` does not collect them unless MICROCNN_BROWSER=1."""

import os

if os.environ.get("MICROCNN_BROWSER") != "1":
    collect_ignore_glob = ["test_*.py"]
