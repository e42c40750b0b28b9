#!/usr/bin/env bash
# Install what sessmob needs on a Debian machine, as root, non-interactively, then build the
# package (with its native helpers) into ./.venv. Idempotent: reruns skip what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 nftables iptables procps gcc make python3 python3-venv python3-dev
              clang-14 libclang-rt-14-dev)
# Tools are looked up by command where a package's presence alone says too little.
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  # Keep package scripts from starting services in the root namespace: tests start their
  # own servers inside their own namespaces.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  trap '[[ $created_policy == 1 ]] && rm -f "$policy"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "bootstrap: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.sessmob-installed
if [[ ! -e $stamp || setup.py -nt $stamp || pyproject.toml -nt $stamp ]] ||
   [[ -n $(find csrc sessmob/_native -newer "$stamp" -name '*.[ch]' -o -newer "$stamp" -name '*_build.py' 2>/dev/null) ]]; then
  echo "bootstrap: installing sessmob and its Python dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import sessmob.tcp_repair" # fails loudly if the native build did not happen
  touch "$stamp"
fi
