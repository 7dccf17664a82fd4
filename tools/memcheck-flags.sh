# The compute-sanitizer memcheck command both device scripts run (gpu-check.sh, device-run.sh's
# stress step): --padding puts 4 KB between allocations, so a stray write into a neighbouring
# allocation is an error too; every process of a test, and exit 9 on any error.
# Sourced: defines the array `memcheck`.
memcheck=(compute-sanitizer --tool memcheck --target-processes all --report-api-errors no
          --padding 4096 --error-exitcode 9)
