# Sourced by the benchmark scripts: what of their tools is missing, and installing it.
#
#   need=($(missing_packages COMMAND:PACKAGE ...))   the packages of the commands not on PATH
#   install_packages LABEL PACKAGE ...               apt-get installs them (nothing if none)

missing_packages() {
  local pair
  for pair in "$@"; do
    command -v "${pair%%:*}" > /dev/null || echo "${pair#*:}"
  done
}

install_packages() {
  local label=$1
  shift
  [ $# -gt 0 ] || return 0
  echo "$label: installing $*" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" > /dev/null
}
