# Sourced by scripts/demo.sh and scripts/test.sh: make sure .venv is set up for this checkout, running
# setup.sh when it is missing or older than setup.py / setup.sh (setup.sh stamps .venv with what it was built from).
# As root with apt-get (CI, a fresh cluster node) setup also installs the Debian packages of the MPI / SLURM tests.
stamp=.venv/.thanora_setup
want=$(cat setup.py setup.sh | sha256sum | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  setup_args=()
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then setup_args=(--cluster-tools); fi
  bash setup.sh "${setup_args[@]}"
fi
