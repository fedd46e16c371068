#!/usr/bin/env bash
# Build the api and worker-cpu images from their Dockerfiles (deploy/build_image.py: mmdebstrap
# root filesystems, umoci) and run them under runc as the restricted pods run: the slow part of
# tests/deploy/test_image_build.py (~12 min on 2 cores; needs root). Assumes `bash scripts/test`
# has installed the project and the services are up.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in mmdebstrap umoci runc; do
  command -v "$tool" >/dev/null 2>&1 || apt-get install -y --no-install-recommends mmdebstrap umoci runc >/dev/null
done
bash scripts/services.sh
export QUANTYARD_REQUIRE_SERVICES=1
exec python3 -m pytest -m slow tests/deploy/test_image_build.py "$@"
