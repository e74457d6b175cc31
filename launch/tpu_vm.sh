#!/usr/bin/env bash
# Runs `python -m rrvf_jax.main <flags>` on every worker of a Cloud TPU VM slice: optionally
# creates the TPU VM, copies this repo to all workers, runs setup.sh plus JAX's TPU wheel there,
# then starts main on all workers at once (nohup, log in ~/rrvf_main.log). JAX finds the other
# workers itself (rrvf_jax.sharding: TPU_WORKER_HOSTNAMES). --dry_run prints every command and
# runs nothing. The --workdir must be shared by the workers (e.g. a gcsfuse-mounted bucket).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: bash launch/tpu_vm.sh --tpu NAME --zone ZONE [--project PROJECT] [--accelerator v5p-64]
                             [--version RUNTIME] [--create] [--dry_run] -- <flags of rrvf_jax.main>
  --tpu NAME          TPU VM name (created with --create, else it must exist)
  --zone ZONE         its zone, e.g. us-east5-a
  --project PROJECT   GCP project (default: gcloud's configured project)
  --accelerator TYPE  accelerator type for --create (default v5p-64: 8 hosts x 4 chips)
  --version RUNTIME   TPU software version for --create (default v2-alpha-tpuv5, for v5p)
  --create            create the TPU VM first
  --dry_run           print the commands, run nothing
example:
  bash launch/tpu_vm.sh --tpu rrvf --zone us-east5-a --create --dry_run -- \
    --config=configs/chart.py --workdir=/gcs/BUCKET/run1
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  usage
  exit 2
}

TPU="" ZONE="" PROJECT="" ACCELERATOR="v5p-64" VERSION="v2-alpha-tpuv5" CREATE=0 DRY_RUN=0
value() { # value FLAG REST...: the flag's value, or a usage error when it is missing.
  [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"
  printf '%s' "$2"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU=$(value "$@"); shift 2 ;;
    --tpu=*) TPU="${1#*=}"; shift ;;
    --zone) ZONE=$(value "$@"); shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --project) PROJECT=$(value "$@"); shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --accelerator) ACCELERATOR=$(value "$@"); shift 2 ;;
    --accelerator=*) ACCELERATOR="${1#*=}"; shift ;;
    --version) VERSION=$(value "$@"); shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --create) CREATE=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (flags of rrvf_jax.main go after --)" ;;
  esac
done
MAIN_ARGS=("$@")
[ -n "$TPU" ] || die "--tpu is required"
[ -n "$ZONE" ] || die "--zone is required"
has_flag() { local f; for f in "${MAIN_ARGS[@]}"; do [[ "$f" == "$1"=* ]] && return 0; done; return 1; }
if [ ${#MAIN_ARGS[@]} -eq 0 ] || ! has_flag --config || ! has_flag --workdir; then
  die "give rrvf_jax.main's --config=... and --workdir=... after --"
fi

# Prints a command as a copy-pasteable shell line (arguments quoted only where needed).
show() {
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}
run() { if [ "$DRY_RUN" = 1 ]; then show "$@"; else show "$@" >&2; "$@"; fi; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/rrvf_jax_src.$$.tar.gz"
TPU_VM=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[ -n "$PROJECT" ] && WHERE+=(--project="$PROJECT")

# The remote command line of main: each flag quoted for the workers' bash.
REMOTE_ARGS=""
for a in "${MAIN_ARGS[@]}"; do REMOTE_ARGS+=" $(printf '%q' "$a")"; done
SETUP='mkdir -p ~/rrvf_jax && tar -xzf ~/rrvf_jax_src.tar.gz -C ~/rrvf_jax && cd ~/rrvf_jax'
SETUP+=' && bash setup.sh && .venv/bin/pip install -q "jax[tpu]==0.10.2"'
START="cd ~/rrvf_jax && nohup .venv/bin/python -m rrvf_jax.main${REMOTE_ARGS}"
START+=' > ~/rrvf_main.log 2>&1 < /dev/null &'

if [ "$CREATE" = 1 ]; then
  run "${TPU_VM[@]}" create "$TPU" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$VERSION"
fi
run tar -czf "$TARBALL" -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=__pycache__ .
run "${TPU_VM[@]}" scp "$TARBALL" "$TPU":rrvf_jax_src.tar.gz "${WHERE[@]}" --worker=all
run rm -f "$TARBALL"
run "${TPU_VM[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$SETUP"
run "${TPU_VM[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$START"
echo "tpu_vm.sh: $([ "$DRY_RUN" = 1 ] && echo 'dry run, nothing started' || echo started)." \
  "Follow worker 0 with: gcloud compute tpus tpu-vm ssh $TPU ${WHERE[*]} --worker=0" \
  "--command='tail -f ~/rrvf_main.log'"
