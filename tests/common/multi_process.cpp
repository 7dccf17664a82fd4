#include "common/multi_process.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <thread>

namespace epx::testing {
namespace {

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

std::string read_all(int fd) {
  std::string text;
  char chunk[4096];
  for (;;) {
    const ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n <= 0) break;
    text.append(chunk, static_cast<size_t>(n));
  }
  return text;
}

}  // namespace

std::vector<RankOutcome> run_ranks(int num_ranks, const std::function<std::string(int)>& fn,
                                   double timeout_seconds, const std::vector<int>& ranks_to_start) {
  std::vector<int> ranks = ranks_to_start;
  if (ranks.empty()) {
    for (int r = 0; r < num_ranks; ++r) ranks.push_back(r);
  }
  std::vector<RankOutcome> outcomes(num_ranks);
  std::vector<pid_t> pids(num_ranks, -1);
  std::vector<int> pipes(num_ranks, -1);
  for (int rank : ranks) {
    int fds[2];
    if (pipe(fds) != 0) {
      outcomes[rank].message = "pipe failed";
      continue;
    }
    const pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      std::string message;
      int code = 0;
      try {
        message = fn(rank);
        code = message.empty() ? 0 : 1;
      } catch (const std::exception& error) {
        message = std::string("exception: ") + error.what();
        code = 2;
      } catch (...) {
        message = "unknown exception";
        code = 3;
      }
      write_all(fds[1], message);
      close(fds[1]);
      _exit(code);  // skip the parent's atexit handlers and gtest state
    }
    close(fds[1]);
    pids[rank] = pid;
    pipes[rank] = fds[0];
  }
  // Read each pipe on its own thread so a chatty rank can never block on a full pipe.
  std::vector<std::thread> readers;
  for (int rank : ranks) {
    if (pipes[rank] < 0) continue;
    readers.emplace_back([&, rank] { outcomes[rank].message = read_all(pipes[rank]); });
  }
  // Wait for all ranks together. Once one fails, its peers are most likely blocked on it until
  // their own (long) transport timeout: give them kFailureGrace to report an error of their own,
  // then stop them, so a failing test reports in seconds instead of hanging for a minute.
  using Clock = std::chrono::steady_clock;
  constexpr auto kFailureGrace = std::chrono::seconds(10);
  auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  std::vector<std::string> kill_reason(num_ranks);
  std::string stop_reason =
      "killed after the test's " + std::to_string(timeout_seconds) + " s limit (hang)";
  bool failure_seen = false;
  for (;;) {
    bool alive = false;
    for (int rank : ranks) {
      if (pids[rank] < 0) continue;
      int status = 0;
      if (waitpid(pids[rank], &status, WNOHANG) != pids[rank]) {
        alive = true;
        continue;
      }
      pids[rank] = -1;
      outcomes[rank].finished = WIFEXITED(status);
      outcomes[rank].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      if (outcomes[rank].exit_code != 0 && !failure_seen) {
        failure_seen = true;
        deadline = std::min(deadline, Clock::now() + kFailureGrace);
        stop_reason = "killed " + std::to_string(kFailureGrace.count()) + " s after rank " +
                      std::to_string(rank) + " failed (probably waiting for it)";
      }
    }
    if (!alive) break;
    if (Clock::now() > deadline) {
      for (int rank : ranks) {
        if (pids[rank] < 0) continue;
        int status = 0;
        kill(pids[rank], SIGKILL);
        waitpid(pids[rank], &status, 0);
        pids[rank] = -1;
        outcomes[rank].finished = false;
        outcomes[rank].exit_code = 0;  // not a signal of its own: the test killed it
        kill_reason[rank] = stop_reason;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (auto& reader : readers) reader.join();
  for (int rank : ranks) {
    if (pipes[rank] >= 0) close(pipes[rank]);
    if (!outcomes[rank].finished && outcomes[rank].message.empty()) {
      outcomes[rank].message = outcomes[rank].exit_code < 0
                                   ? "died of signal " + std::to_string(-outcomes[rank].exit_code)
                                   : kill_reason[rank];
    }
  }
  return outcomes;
}

std::string failures(const std::vector<RankOutcome>& outcomes) {
  std::string text;
  for (size_t rank = 0; rank < outcomes.size(); ++rank) {
    const RankOutcome& outcome = outcomes[rank];
    if (outcome.finished && outcome.exit_code == 0 && outcome.message.empty()) continue;
    text += "rank " + std::to_string(rank) + " (exit " + std::to_string(outcome.exit_code) +
            "): " + outcome.message + "\n";
  }
  return text;
}

std::string unique_name(const std::string& prefix) {
  static std::atomic<int> counter{0};
  return prefix + "-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
}

}  // namespace epx::testing
