# Shell helpers shared by scripts/test.sh and scripts/setup_comfy.sh (sourced, not run).

# Run a noisy install quietly, but show everything it said if it fails.
quiet() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
}

# need_debian_package COMMAND PACKAGE WHY: install PACKAGE with apt-get when COMMAND is missing
# (as root); otherwise say what to install and why, and fail.
need_debian_package() {
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "missing $1: install the Debian package $2 with apt-get ($3)" >&2
    return 1
  fi
}
