#!/usr/bin/env bash
# Cloud TPU VM slices: create one, install tinyclip_jax on every worker, run the same
# `python3 -m tinyclip_jax.main` on all workers (jax.distributed.initialize() finds the
# slice by itself), follow the log of worker 0, delete the slice.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND [OPTIONS] [-- MAIN_ARGS...]
#
# COMMAND: create | setup | run | logs | delete | all (create, setup, run, delete)
#          | relaunch (all, again and again on a Spot slice until the run finishes: a
#            preempted run saved a checkpoint on SIGTERM and resumes from its workdir).
# Every option can also come from the environment variable in brackets:
#   --name=NAME            [TPU_NAME]     the TPU VM (required)
#   --zone=ZONE            [TPU_ZONE]     e.g. us-central2-b (required)
#   --project=PROJECT      [TPU_PROJECT]  default: gcloud's configured project
#   --type=TYPE            [TPU_TYPE]     accelerator type, e.g. v4-32 (create)
#   --version=VERSION      [TPU_VERSION]  runtime, e.g. tpu-ubuntu2204-base (create)
#   --spot                 [TPU_SPOT=1]   a Spot (preemptible) slice (create)
#   --repo=URL             [REPO_URL]     git URL to clone on the workers (setup); without
#                                         it this checkout's HEAD is copied (git archive)
#   --ref=REF              [REPO_REF]     branch or tag to clone (default main)
#   --config=FILE          [CONFIG]       e.g. configs/vit39m.py (run)
#   --workdir=DIR          [WORKDIR]      gs://bucket/run: every worker must reach it (run)
#   --worker=N             [TPU_WORKER]   whose log `logs` follows (default 0)
#   --keep                                `all` leaves the slice up after the run
#   --detach                              `run` starts the job and returns
#   --attempts=N           [TPU_ATTEMPTS] relaunch: slices to try before giving up (default 20)
# Arguments after `--` go to tinyclip_jax.main, e.g. --config.teacher.checkpoint=gs://...
# --dry-run prints every command (one per line, shell-quoted) instead of running it.
set -euo pipefail

readonly USAGE="launch/tpu_vm.sh [--dry-run] create|setup|run|logs|delete|all|relaunch --name=NAME \
--zone=ZONE [--type=TYPE --version=VERSION] [--config=FILE --workdir=DIR] [-- MAIN_ARGS...]"
readonly REMOTE_DIR='$HOME/tinyclip_jax'   # expanded on the workers
readonly RUN_FILES='$HOME/tinyclip_run'     # .log, .pid, .rc on every worker

die() {
  echo "error: $*; usage: ${USAGE}" >&2
  exit 2
}

# A command as one line that `sh` (and Python's shlex) reads back as the same words.
show() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

x() {  # run a command, or print it with --dry-run
  if [[ "${DRY_RUN}" == 1 ]]; then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

DRY_RUN=0
COMMAND=""
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-}"
VERSION="${TPU_VERSION:-}"
SPOT="${TPU_SPOT:-0}"
REPO="${REPO_URL:-}"
REF="${REPO_REF:-main}"
CONFIG_FILE="${CONFIG:-}"
WORK="${WORKDIR:-}"
WORKER="${TPU_WORKER:-0}"
KEEP=0
DETACH=0
ATTEMPTS="${TPU_ATTEMPTS:-20}"
MAIN_ARGS=()

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --config=*) CONFIG_FILE="${1#*=}" ;;
    --workdir=*) WORK="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --keep) KEEP=1 ;;
    --detach) DETACH=1 ;;
    --attempts=*) ATTEMPTS="${1#*=}" ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) [[ -z "${COMMAND}" ]] || die "a second command '$1' (give one of create|setup|run|logs|delete|all)"
       COMMAND="$1" ;;
  esac
  shift
done

case "${COMMAND}" in
  create|setup|run|logs|delete|all|relaunch) ;;
  "") die "no command given" ;;
  *) die "unknown command '${COMMAND}'" ;;
esac
need() {  # need VALUE FLAG ENV
  [[ -n "$1" ]] || die "${COMMAND} needs $2 (or \$$3)"
}
need "${NAME}" --name TPU_NAME
need "${ZONE}" --zone TPU_ZONE
if [[ "${COMMAND}" == create || "${COMMAND}" == all || "${COMMAND}" == relaunch ]]; then
  need "${TYPE}" --type TPU_TYPE
  need "${VERSION}" --version TPU_VERSION
fi
if [[ "${COMMAND}" == run || "${COMMAND}" == all || "${COMMAND}" == relaunch ]]; then
  need "${CONFIG_FILE}" --config CONFIG
  need "${WORK}" --workdir WORKDIR
fi
[[ "${COMMAND}" != all || "${DETACH}" != 1 ]] || die "--detach does not go with all, which \
waits for the run to end before deleting the slice"
[[ "${COMMAND}" != relaunch || "${DETACH}" != 1 ]] || die "--detach does not go with \
relaunch, which watches the run to relaunch it"
[[ "${ATTEMPTS}" =~ ^[1-9][0-9]*$ ]] || die "--attempts=${ATTEMPTS} is not a positive count"
[[ "${COMMAND}" != relaunch || "${WORK}" == gs://* ]] || die "relaunch needs a gs:// \
--workdir: a slice's local disk goes with the slice, so every relaunch would start over"
[[ "${WORKER}" =~ ^[0-9]+$ ]] || die "--worker=${WORKER} is not a worker index (0, 1, ...)"

WHERE=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || WHERE+=(--project="${PROJECT}")

ssh_all() { x gcloud compute tpus tpu-vm ssh "${NAME}" "${WHERE[@]}" --worker=all --command="$1"; }
ssh_one() { x gcloud compute tpus tpu-vm ssh "${NAME}" "${WHERE[@]}" --worker="${WORKER}" --command="$1"; }

create() {
  local extra=()
  [[ "${SPOT}" != 1 ]] || extra+=(--spot)
  x gcloud compute tpus tpu-vm create "${NAME}" "${WHERE[@]}" --accelerator-type="${TYPE}" \
    --version="${VERSION}" "${extra[@]}"
}

setup() {
  local fetch
  if [[ -n "${REPO}" ]]; then
    fetch="rm -rf ${REMOTE_DIR} && git clone --depth=1 --branch=$(printf %q "${REF}") \
$(printf %q "${REPO}") ${REMOTE_DIR}"
  else
    # This checkout's HEAD (commit first: uncommitted changes are not copied).
    local archive="${TMPDIR:-/tmp}/tinyclip_jax-${NAME}.tar.gz"
    local root
    root="$(cd "$(dirname "$0")/.." && pwd)"
    x git -C "${root}" archive --format=tar.gz --output="${archive}" HEAD
    x gcloud compute tpus tpu-vm scp "${archive}" "${NAME}":tinyclip_jax.tar.gz "${WHERE[@]}" \
      --worker=all
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && \
tar -xzf \$HOME/tinyclip_jax.tar.gz -C ${REMOTE_DIR}"
  fi
  # jax[tpu] from PyPI brings libtpu; the package's own dependencies come with -e.
  ssh_all "${fetch} && python3 -m pip install -U pip && \
python3 -m pip install -e ${REMOTE_DIR} 'jax[tpu]'"
}

main_command() {  # the training command, quoted for the workers' shell
  # --distributed=on: a TPU VM slice is described by the metadata server, not by the
  # environment main.py's `auto` looks at; a one-host slice joins as a cluster of one.
  local words=(python3 -m tinyclip_jax.main --config="${CONFIG_FILE}" --workdir="${WORK}"
    --distributed=on "${MAIN_ARGS[@]}")
  printf '%q ' "${words[@]}"
}

run() {
  # Detached on every worker (an ssh drop must not end a multi-day run); the exit
  # code lands in tinyclip_run.rc.
  ssh_all "cd ${REMOTE_DIR} && rm -f ${RUN_FILES}.rc && \
(setsid nohup bash -c $(printf %q "$(main_command)"'; echo $? > $HOME/tinyclip_run.rc') \
> ${RUN_FILES}.log 2>&1 < /dev/null & echo \$! > ${RUN_FILES}.pid)"
  if [[ "${DETACH}" == 1 ]]; then
    return 0
  fi
  logs
  # Worker 0's exit code is the run's: every worker runs the same program in lockstep.
  ssh_one "exit \$(cat ${RUN_FILES}.rc 2>/dev/null || echo 1)"
}

logs() {  # follows one worker's log until its run ends
  ssh_one "tail -n +1 --pid=\$(cat ${RUN_FILES}.pid) -f ${RUN_FILES}.log"
}

delete() {
  x gcloud compute tpus tpu-vm delete "${NAME}" "${WHERE[@]}" --quiet
}

relaunch() {
  # A Spot slice is taken back with a SIGTERM to every worker: the run saves a
  # checkpoint and exits 0 before its run finished, or the slice vanishes mid-step and
  # the run resumes from the newest complete checkpoint. Either way the next slice
  # resumes from the workdir; the run is done when `status` says so (its exports
  # committed). Exit 2 (the run or status refused the config or a path) stops the loop:
  # another slice would be refused the same way.
  local attempt rc
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    echo "# relaunch: attempt ${attempt} of ${ATTEMPTS}" >&2
    create || { delete || true; continue; }   # no capacity now: try again
    rc=0
    { setup && run; } || rc=$?
    if ((rc == 0)); then
      finished || rc=$?
      if ((rc == 0)); then
        delete
        return 0
      fi
    fi
    delete || true
    if ((rc == 2)); then
      echo "error: the run refused its config or a path (exit 2; see its log above); fix it \
and relaunch" >&2
      return 2
    fi
    if [[ "${DRY_RUN}" == 1 ]]; then
      echo "# relaunch: until final/ is committed in ${WORK}, again from create (at most \
${ATTEMPTS} slices)"
      return 0
    fi
  done
  echo "error: the run did not finish on ${ATTEMPTS} slices; see its log in ${WORK}" >&2
  return 1
}

finished() {  # status: 0 finished, 1 not yet (a preempted run exits 0 unfinished), 2 error
  if [[ "${DRY_RUN}" == 1 ]]; then
    x python3 -m tinyclip_jax.status --config="${CONFIG_FILE}" --workdir="${WORK}" \
      "${MAIN_ARGS[@]}"
    return 1
  fi
  python3 -m tinyclip_jax.status --config="${CONFIG_FILE}" --workdir="${WORK}" \
    "${MAIN_ARGS[@]}" >&2
}

case "${COMMAND}" in
  create) create ;;
  setup) setup ;;
  run) run ;;
  logs) logs ;;
  delete) delete ;;
  relaunch) SPOT=1; relaunch ;;
  all)
    create
    if [[ "${KEEP}" != 1 ]]; then
      trap delete EXIT   # tear down however the run ends (also on Ctrl-C)
    fi
    setup
    run
    ;;
esac
