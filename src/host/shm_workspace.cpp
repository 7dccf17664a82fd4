#include "host/shm_workspace.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include "epx/error.hpp"

namespace epx::detail {
namespace {

// Each segment starts with this header page; the workspace follows it. A creator sets `ready`
// last (release), so a peer that sees it (acquire) also sees the size and a zeroed workspace.
struct SegmentHeader {
  uint64_t ready;
  uint64_t workspace_bytes;
};
constexpr uint64_t kReadyMagic = 0x6570782d72656479ull;  // "epx-redy"
constexpr size_t kHeaderBytes = 4096;

// Spin briefly, then yield, then sleep: waits stay cheap when a peer is close behind and do not
// burn a core when it is far behind (CI machines have two cores for many rank processes).
class Backoff {
 public:
  void pause() {
    ++spins_;
    if (spins_ < 64) return;
    if (spins_ < 256) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

 private:
  int spins_ = 0;
};

std::chrono::steady_clock::time_point deadline_after(double seconds) {
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(
             std::chrono::duration<double>(seconds));
}

}  // namespace

ShmWorkspace::ShmWorkspace(const std::string& name, int rank, int num_ranks,
                           const plan::WorkspaceLayout& layout, double timeout_seconds)
    : name_(name), rank_(rank), num_ranks_(num_ranks), layout_(layout),
      timeout_seconds_(timeout_seconds), mappings_(num_ranks), peers_(num_ranks, nullptr) {
  mappings_[rank_] = create_own_segment();
  try {
    const auto deadline = deadline_after(timeout_seconds_);
    for (int p = 0; p < num_ranks_; ++p) {
      if (p != rank_) mappings_[p] = open_peer_segment(p, deadline);
    }
    for (int p = 0; p < num_ranks_; ++p) peers_[p] = mappings_[p].address + kHeaderBytes;
    // Once every rank has mapped every segment, the names are no longer needed: unlinking now
    // leaves nothing behind in /dev/shm even if a process is killed later.
    barrier("buffer-setup");
  } catch (...) {
    release();
    throw;
  }
  shm_unlink(segment_name(rank_).c_str());
  own_unlinked_ = true;
}

ShmWorkspace::~ShmWorkspace() { release(); }

void ShmWorkspace::release() {
  for (Mapping& mapping : mappings_) {
    if (mapping.address) munmap(mapping.address, mapping.bytes);
    mapping = Mapping{};
  }
  if (!own_unlinked_) {
    shm_unlink(segment_name(rank_).c_str());
    own_unlinked_ = true;
  }
}

std::string ShmWorkspace::segment_name(int rank) const {
  return "/epx-" + name_ + "-r" + std::to_string(rank);
}

ShmWorkspace::Mapping ShmWorkspace::create_own_segment() {
  const std::string segment = segment_name(rank_);
  const size_t bytes = kHeaderBytes + static_cast<size_t>(layout_.total_bytes());
  const int fd = shm_open(segment.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  EPX_CHECK(fd >= 0, kTransport,
            "rank " << rank_ << ": cannot create shared memory segment " << segment << ": "
                    << std::strerror(errno)
                    << (errno == EEXIST ? " (a run with the same communicator name is alive or "
                                          "crashed; use a fresh name)"
                                        : ""));
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int error = errno;
    close(fd);
    shm_unlink(segment.c_str());
    EPX_FAIL(kTransport, "rank " << rank_ << ": cannot size " << segment << " to " << bytes
                                 << " bytes: " << std::strerror(error));
  }
  void* address = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (address == MAP_FAILED) {
    const int error = errno;
    shm_unlink(segment.c_str());
    EPX_FAIL(kTransport, "rank " << rank_ << ": cannot map " << segment << ": "
                                 << std::strerror(error));
  }
  // ftruncate zero-fills the segment, so flags start at epoch 0.
  auto* header = static_cast<SegmentHeader*>(address);
  header->workspace_bytes = static_cast<uint64_t>(layout_.total_bytes());
  std::atomic_ref<uint64_t>(header->ready).store(kReadyMagic, std::memory_order_release);
  return Mapping{static_cast<char*>(address), bytes};
}

ShmWorkspace::Mapping ShmWorkspace::open_peer_segment(
    int peer, std::chrono::steady_clock::time_point deadline) {
  const std::string segment = segment_name(peer);
  const size_t bytes = kHeaderBytes + static_cast<size_t>(layout_.total_bytes());
  Backoff backoff;
  for (;;) {
    const int fd = shm_open(segment.c_str(), O_RDWR, 0600);
    if (fd >= 0) {
      struct stat info {};
      if (fstat(fd, &info) == 0 && static_cast<size_t>(info.st_size) >= bytes) {
        void* address = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        EPX_CHECK(address != MAP_FAILED, kTransport,
                  "rank " << rank_ << ": cannot map peer segment " << segment << ": "
                          << std::strerror(errno));
        auto* header = static_cast<SegmentHeader*>(address);
        Backoff ready_backoff;
        while (std::atomic_ref<uint64_t>(header->ready).load(std::memory_order_acquire) !=
               kReadyMagic) {
          if (std::chrono::steady_clock::now() > deadline) {
            munmap(address, bytes);
            EPX_FAIL(kTimeout, "rank " << rank_ << ": phase buffer-setup timed out after "
                                       << timeout_seconds_ << " s waiting for rank " << peer
                                       << " to initialise " << segment);
          }
          ready_backoff.pause();
        }
        if (header->workspace_bytes == static_cast<uint64_t>(layout_.total_bytes())) {
          return Mapping{static_cast<char*>(address), bytes};
        }
        const uint64_t seen = header->workspace_bytes;
        munmap(address, bytes);
        EPX_FAIL(kInvalidArgument,
                 "rank " << rank_ << ": peer " << peer << "'s workspace has " << seen
                         << " bytes, this rank expects " << layout_.total_bytes()
                         << ": every rank must pass the same BufferConfig");
      }
      close(fd);
    }
    if (std::chrono::steady_clock::now() > deadline) {
      EPX_FAIL(kTimeout, "rank " << rank_ << ": phase buffer-setup timed out after "
                                 << timeout_seconds_ << " s waiting for rank " << peer
                                 << " (its shared memory segment " << segment
                                 << " never appeared)");
    }
    backoff.pause();
  }
}

void ShmWorkspace::barrier(const char* phase) {
  const uint64_t epoch = ++epoch_;
  // Release: every row, metadata and scalar this rank wrote into peers before this point is
  // visible to a peer that acquires the flag.
  for (int p = 0; p < num_ranks_; ++p) {
    std::atomic_ref<uint64_t>(*layout_.flag(peers_[p], rank_))
        .store(epoch, std::memory_order_release);
  }
  const auto deadline = deadline_after(timeout_seconds_);
  int aborted_by = -1;
  for (int p = 0; p < num_ranks_; ++p) {
    Backoff backoff;
    for (;;) {
      const uint64_t seen =
          std::atomic_ref<uint64_t>(*layout_.flag(local(), p)).load(std::memory_order_acquire);
      if (seen >= epoch) {
        // Read after the acquire of the flag, which the aborting peer released after it.
        const uint64_t aborted =
            std::atomic_ref<uint64_t>(*layout_.abort_epoch(local(), p))
                .load(std::memory_order_relaxed);
        if (aborted == epoch && aborted_by < 0) aborted_by = p;
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        EPX_FAIL(kTimeout, "rank " << rank_ << ": phase " << phase << " timed out after "
                                   << timeout_seconds_ << " s waiting for rank " << p
                                   << " (expected epoch " << epoch << ", saw " << seen << ")");
      }
      backoff.pause();
    }
  }
  EPX_CHECK(aborted_by < 0, kInvalidArgument,
            "rank " << rank_ << ": phase " << phase << " aborted: rank " << aborted_by
                    << " rejected its input to this operation (see that rank's error)");
}

void ShmWorkspace::abort(const char* /*operation*/) {
  const uint64_t epoch = ++epoch_;
  for (int p = 0; p < num_ranks_; ++p) {
    std::atomic_ref<uint64_t>(*layout_.abort_epoch(peers_[p], rank_))
        .store(epoch, std::memory_order_relaxed);
    std::atomic_ref<uint64_t>(*layout_.flag(peers_[p], rank_))
        .store(epoch, std::memory_order_release);
  }
}

}  // namespace epx::detail
