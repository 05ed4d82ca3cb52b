#!/usr/bin/env bash
# Install MONAI Label 0.8.5 and this app's server dependencies into the active Python environment (a venv that
# already has torch and medcore-monai). Usage: bash label_app/install.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python -m pip install --quiet -r "$here/requirements.txt"
# last and without dependencies: their own requirements would pull sam2, torchvision, a CUDA torch and numpy < 2
python -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
python -c "import monailabel, fastapi, itk; print('MONAI Label', monailabel.__version__, 'installed')"
