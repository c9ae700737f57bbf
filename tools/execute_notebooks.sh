#!/usr/bin/env bash
# Re-execute every notebook in order, in place, with this checkout's microcnn (PYTHONPATH wins over any
# installed copy) and the kernel of the current environment; then check them with
#   python -m pytest notebooks/ -p no:cacheprovider
# Timing cells are tagged nbval-ignore-output (the tags survive re-execution); everything else is
# compared by nbval, so it must print the same on every machine. Usage: tools/execute_notebooks.sh [NB...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MICROCNN_DATA="${MICROCNN_DATA:-$(cd .. && pwd)/shared/datasets/mnist}"
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(notebooks/[0-9][0-9]_*.ipynb)
for nb in "${notebooks[@]}"; do
    start=$SECONDS
    # no widget state in the files: it is large and the widgets need a live kernel anyway
    jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=3600 \
        --ExecutePreprocessor.store_widget_state=False \
        --ExecutePreprocessor.kernel_name=python3 "$nb"
    # drop widget state an earlier run may have stored (nbconvert keeps existing metadata)
    python -c "import nbformat, sys; nb = nbformat.read(sys.argv[1], 4); nb.metadata.pop(\"widgets\", None); nbformat.write(nb, sys.argv[1])" "$nb"
    echo "executed $nb in $((SECONDS - start)) s"
done
