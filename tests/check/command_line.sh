#!/usr/bin/env bash
# command_line.sh PROGRAM: PROGRAM's command line is strict. --help prints the usage and exits
# 0; an unknown option, an option without its value and a value that is no number each print
# the usage and exit 2, before any rank starts.
set -u
program=$1
failures=0
expect() {  # expect STATUS STREAM ARGS...: exit status and where the usage went
  local want=$1 stream=$2; shift 2
  local stdout stderr status
  stdout=$("$program" "$@" 2>/dev/null); status=$?
  stderr=$("$program" "$@" 2>&1 >/dev/null)
  local text=$stdout
  [ "$stream" = stderr ] && text=$stderr
  if [ "$status" != "$want" ] || [[ "$text" != *usage:* ]]; then
    echo "FAIL: $program $* exited $status (want $want) with usage on $stream: '$text'"
    failures=$((failures + 1))
  fi
}
expect 0 stdout --help
expect 2 stderr --frobnicate
expect 2 stderr --tokens
expect 2 stderr --tokens many
expect 2 stderr --ranks 0
exit $((failures > 0))
