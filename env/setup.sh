#!/usr/bin/env bash
# Bootstrap .venv: create it when missing, (re)install when requirements.txt
# changed. torch is installed first, alone and pinned, so no other package can
# pull a different (multi-GB CUDA) build. A GPU user who pre-installed a CUDA
# build of the same torch version into .venv keeps it: the pin is satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 10), "Python >= 3.10 needed, 3.11 recommended"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "==> installing requirements into $VENV (about 2 minutes)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
torch_pin=$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)
"$VENV/bin/python" -m pip install --quiet "$torch_pin"
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
# make the package importable from the venv without installing a copy of it
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/knowlm_nb.pth"
# a kernelspec inside the venv that points at the venv's python
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null
"$VENV/bin/python" -m pip check >/dev/null || { echo "pip check failed:"; "$VENV/bin/python" -m pip check; exit 1; }
echo "$want" > "$STAMP"
echo "==> $VENV ready"
