// Runs one function per rank, each in its own forked process, as the host transport expects.
// A rank reports failure by returning a non-empty message or by throwing; the parent kills
// every rank still alive after `timeout_seconds`, or 10 s after the first rank failed (its peers
// are then usually waiting for it), so a test can never hang.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace epx::testing {

struct RankOutcome {
  bool finished = false;  // exited on its own (not killed)
  int exit_code = -1;
  std::string message;  // what the rank returned, or the exception it threw
};

std::vector<RankOutcome> run_ranks(int num_ranks, const std::function<std::string(int rank)>& fn,
                                   double timeout_seconds = 120.0,
                                   const std::vector<int>& ranks_to_start = {});

// Joins the failures of all ranks into one message ("" when every rank returned "").
std::string failures(const std::vector<RankOutcome>& outcomes);

// A shared-memory name no other test process uses: prefix, pid and a counter.
std::string unique_name(const std::string& prefix);

}  // namespace epx::testing
