#!/usr/bin/env bash
# Entrypoint of the fusedist image (launch/Dockerfile).
#
#   docker run IMAGE tile -c configs/tile/pairs.yaml ...  ->  fusedist tile -c ...
#   docker run IMAGE doctor                               ->  fusedist doctor
#   docker run IMAGE ray status | mlflow ... | bash       ->  run as given
#
# A first word that is not a program on PATH is a fusedist subcommand, so new stages need no
# change here. KubeRay and the manifests in k8s/ set their own command; this serves
# `docker run` and plain Kubernetes Jobs.
set -euo pipefail

if [[ "$(id -u)" == "0" ]]; then
  echo "fusedist-entrypoint: running as root; the image's user is 1000 (k8s/ runs as 1000)" >&2
fi

# Slide copies and caches need a writable folder, even under a read-only root filesystem.
export FUSEDIST_CACHE="${FUSEDIST_CACHE:-${HOME:-/tmp}/.cache/fusedist}"
if ! mkdir -p "$FUSEDIST_CACHE" 2>/dev/null; then
  export FUSEDIST_CACHE=/tmp/fusedist-cache
  mkdir -p "$FUSEDIST_CACHE"
fi

if [[ $# -eq 0 || "$1" == -* ]] || ! type -P "$1" >/dev/null; then
  exec fusedist "$@"
fi
exec "$@"
