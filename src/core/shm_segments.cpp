#include "core/shm_segments.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <thread>

#include "core/op_fingerprint.hpp"
#include "epx/error.hpp"

namespace epx::detail {
namespace {

// The start of every segment. A creator writes its pid and record, then sets `ready` (release):
// a peer that sees `ready` (acquire) sees the rest.
struct SegmentHeader {
  uint64_t ready;
  uint64_t pid;
  uint64_t payload_bytes;
  uint64_t records_read;  // set once this rank has read every peer's record
  SetupRecord record;
};
constexpr uint64_t kReadyMagic = 0x6570782d72656479ull;  // "epx-redy"
constexpr size_t kPageBytes = 4096;
static_assert(sizeof(SegmentHeader) <= kPageBytes);

size_t header_bytes_for(int num_ranks) {
  const size_t bytes = kPageBytes + static_cast<size_t>(plan::peer_lines_bytes(num_ranks));
  return (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
}

SegmentHeader* header_of(char* segment) {
  return reinterpret_cast<SegmentHeader*>(segment);
}

std::atomic_ref<uint64_t> word(uint64_t& value) {
  return std::atomic_ref<uint64_t>(value);
}

bool process_alive(uint64_t pid) {
  return pid != 0 && (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH);
}

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

// Maps the first `bytes` of segment `name` if it exists and is at least that large.
char* map_existing(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) return nullptr;
  struct stat info {};
  void* address = MAP_FAILED;
  if (fstat(fd, &info) == 0 && static_cast<size_t>(info.st_size) >= bytes) {
    address = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  close(fd);
  return address == MAP_FAILED ? nullptr : static_cast<char*>(address);
}

// The pid that created segment `name`, or 0 when it has none (yet).
uint64_t creator_of(const std::string& name) {
  char* page = map_existing(name, kPageBytes);
  if (!page) return 0;
  const uint64_t pid = word(header_of(page)->pid).load(std::memory_order_acquire);
  munmap(page, kPageBytes);
  return pid;
}

}  // namespace

void check_segment_ranks_and_name(const char* transport, int rank, int num_ranks,
                                  const std::string& name) {
  EPX_CHECK(num_ranks >= 1 && num_ranks <= 64, kInvalidArgument,
            "the " << transport << " transport supports 1 to 64 ranks, got " << num_ranks);
  EPX_CHECK(rank >= 0 && rank < num_ranks, kInvalidArgument,
            "rank " << rank << " is outside [0, " << num_ranks << ")");
  EPX_CHECK(!name.empty() && name.size() <= 128, kInvalidArgument,
            "the " << transport << " communicator name must have 1 to 128 characters");
  for (char c : name) {
    EPX_CHECK(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_', kInvalidArgument,
              "the " << transport << " communicator name may hold letters, digits, '-' and '_' "
                     << "only: '" << name << "'");
  }
}

ShmSegments::ShmSegments(const std::string& name, int rank, int num_ranks, size_t payload_bytes,
                         const SetupRecord& record, double timeout_seconds)
    : name_(name),
      rank_(rank),
      num_ranks_(num_ranks),
      payload_bytes_(payload_bytes),
      header_bytes_(header_bytes_for(num_ranks)),
      timeout_seconds_(timeout_seconds),
      mappings_(num_ranks),
      payloads_(num_ranks, nullptr) {
  create_own_segment(record);
  try {
    const auto deadline = deadline_after(timeout_seconds_);
    check_records(record, deadline);
    map_payloads();
    barrier("buffer-setup");
  } catch (...) {
    unlink_peers();  // this setup failed for every rank: a dead peer's segment goes too
    release();
    throw;
  }
  // Every rank has mapped every segment: the names are no longer needed. Each rank unlinks all
  // of them (a second unlink of a name finds nothing), so a rank killed right after the barrier
  // leaves nothing behind either.
  unlink_peers();
  shm_unlink(segment_name(rank_).c_str());
  own_unlinked_ = true;
}

ShmSegments::~ShmSegments() {
  release();
}

std::string ShmSegments::segment_name(int rank) const {
  return "/epx-" + name_ + "-r" + std::to_string(rank);
}

char* ShmSegments::lines(int rank) const {
  return mappings_[rank].address + kPageBytes;
}

void ShmSegments::create_own_segment(const SetupRecord& record) {
  const std::string segment = segment_name(rank_);
  const size_t bytes = header_bytes_ + payload_bytes_;
  int fd = shm_open(segment.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0 && errno == EEXIST) {
    // Left by an earlier run under the same name: replaced when its creator is gone.
    const uint64_t owner = creator_of(segment);
    EPX_CHECK(!process_alive(owner), kTransport,
              "rank " << rank_ << ": shared memory segment " << segment
                      << " belongs to a live process (pid " << owner
                      << "): another job uses the communicator name '" << name_
                      << "'; give each job its own");
    shm_unlink(segment.c_str());
    fd = shm_open(segment.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  }
  EPX_CHECK(fd >= 0, kTransport,
            "rank " << rank_ << ": cannot create shared memory segment " << segment << ": "
                    << std::strerror(errno));
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
    EPX_FAIL(kTransport,
             "rank " << rank_ << ": cannot map " << segment << ": " << std::strerror(error));
  }
  mappings_[rank_] = Mapping{static_cast<char*>(address), bytes};
  // ftruncate zero-fills: flags start at epoch 0, records empty.
  SegmentHeader* header = header_of(mappings_[rank_].address);
  header->pid = static_cast<uint64_t>(getpid());
  header->payload_bytes = payload_bytes_;
  header->record = record;
  word(header->ready).store(kReadyMagic, std::memory_order_release);
}

ShmSegments::Mapping ShmSegments::open_header(int peer,
                                              std::chrono::steady_clock::time_point deadline) {
  const std::string segment = segment_name(peer);
  Backoff backoff;
  for (;;) {
    char* page = map_existing(segment, kPageBytes);
    if (page && word(header_of(page)->ready).load(std::memory_order_acquire) == kReadyMagic) {
      return Mapping{page, kPageBytes};
    }
    if (page) munmap(page, kPageBytes);
    if (std::chrono::steady_clock::now() > deadline) {
      EPX_FAIL(kTimeout, "rank " << rank_ << ": phase buffer-setup timed out after "
                                 << timeout_seconds_ << " s waiting for rank " << peer
                                 << " (its shared memory segment " << segment
                                 << (page ? " was never initialised)" : " never appeared)"));
    }
    backoff.pause();
  }
}

void ShmSegments::check_records(const SetupRecord& mine,
                                std::chrono::steady_clock::time_point deadline) {
  for (int p = 0; p < num_ranks_; ++p) {
    if (p != rank_) mappings_[p] = open_header(p, deadline);
  }
  word(header_of(mappings_[rank_].address)->records_read).store(1, std::memory_order_release);
  // Nobody raises (and unlinks its segment) before every rank has read every record: then each
  // rank has seen the same records, and all of them raise alike.
  for (int p = 0; p < num_ranks_; ++p) {
    Backoff backoff;
    while (word(header_of(mappings_[p].address)->records_read).load(std::memory_order_acquire) ==
           0) {
      EPX_CHECK(std::chrono::steady_clock::now() <= deadline, kTimeout,
                "rank " << rank_ << ": phase buffer-setup timed out after " << timeout_seconds_
                        << " s waiting for rank " << p << " to read the peers' configurations");
      backoff.pause();
    }
  }
  for (int p = 0; p < num_ranks_; ++p) {
    const std::string mismatch =
        setup_mismatch(mine, rank_, header_of(mappings_[p].address)->record, p);
    EPX_CHECK(mismatch.empty(), kInvalidArgument,
              "rank " << rank_ << ": buffer setup: " << mismatch);
  }
}

void ShmSegments::map_payloads() {
  const size_t bytes = header_bytes_ + payload_bytes_;
  for (int p = 0; p < num_ranks_; ++p) {
    if (p != rank_) {
      munmap(mappings_[p].address, mappings_[p].bytes);
      mappings_[p] = Mapping{};
      char* address = map_existing(segment_name(p), bytes);
      EPX_CHECK(address != nullptr, kTransport,
                "rank " << rank_ << ": cannot map peer segment " << segment_name(p) << ": "
                        << std::strerror(errno));
      mappings_[p] = Mapping{address, bytes};
    }
    payloads_[p] = mappings_[p].address + header_bytes_;
  }
}

void ShmSegments::unlink_peers() {
  for (int p = 0; p < num_ranks_; ++p) {
    if (p != rank_) shm_unlink(segment_name(p).c_str());
  }
}

void ShmSegments::release() {
  for (Mapping& mapping : mappings_) {
    if (mapping.address) munmap(mapping.address, mapping.bytes);
    mapping = Mapping{};
  }
  if (!own_unlinked_) {
    shm_unlink(segment_name(rank_).c_str());
    own_unlinked_ = true;
  }
}

void ShmSegments::barrier(const char* phase, const plan::OpFingerprint* op) {
  const uint64_t epoch = ++epoch_;
  // Release: every row, metadata, scalar and record this rank wrote into peers before this
  // point is visible to a peer that acquires the flag.
  for (int p = 0; p < num_ranks_; ++p) {
    if (op) {
      plan::PeerRecord* record = plan::peer_record(lines(p), num_ranks_, rank_);
      record->op_epoch = epoch;
      record->op = *op;
    }
    word(*plan::peer_flag(lines(p), rank_)).store(epoch, std::memory_order_release);
  }
  const auto deadline = deadline_after(timeout_seconds_);
  int aborted_by = -1;
  std::string mismatch;
  bool peer_ahead = false;  // a peer's record is of a later barrier: it has gone on without us
  for (int p = 0; p < num_ranks_; ++p) {
    plan::PeerRecord* record = plan::peer_record(lines(rank_), num_ranks_, p);
    Backoff backoff;
    for (;;) {
      EPX_CHECK(word(record->poisoned).load(std::memory_order_relaxed) == 0, kUnusable,
                "rank " << rank_ << ": phase " << phase << ": rank " << p
                        << "'s buffer failed earlier (see that rank's error); build a new "
                           "Buffer on every rank");
      const uint64_t seen = word(*plan::peer_flag(lines(rank_), p)).load(std::memory_order_acquire);
      if (seen >= epoch) break;
      if (std::chrono::steady_clock::now() > deadline) {
        EPX_FAIL(kTimeout, "rank " << rank_ << ": phase " << phase << " timed out after "
                                   << timeout_seconds_ << " s waiting for rank " << p
                                   << " (expected epoch " << epoch << ", saw " << seen << ")");
      }
      backoff.pause();
    }
    // Read after the acquire of the flag, which the peer released after writing them.
    if (word(record->abort_epoch).load(std::memory_order_relaxed) == epoch) {
      if (aborted_by < 0) aborted_by = p;
    } else if (op && mismatch.empty()) {
      peer_ahead = record->op_epoch != epoch;
      mismatch = describe_op_mismatch(*op, rank_, peer_ahead ? nullptr : &record->op, p);
    }
  }
  EPX_CHECK(aborted_by < 0, kInvalidArgument,
            "rank " << rank_ << ": phase " << phase << " aborted: rank " << aborted_by
                    << (op ? " rejected its input to this operation" : " failed its part")
                    << " (see that rank's error)");
  if (mismatch.empty()) return;
  // Every rank sees a difference when any two ranks differ (equal fingerprints are equal to
  // each other), so all of them come here; one more barrier keeps each rank from writing its
  // next operation's record before every peer has read this one.
  if (!peer_ahead) barrier(phase);
  EPX_FAIL(kInvalidArgument, "rank " << rank_ << ": phase " << phase << ": " << mismatch);
}

void ShmSegments::abort() {
  const uint64_t epoch = ++epoch_;
  for (int p = 0; p < num_ranks_; ++p) {
    word(plan::peer_record(lines(p), num_ranks_, rank_)->abort_epoch)
        .store(epoch, std::memory_order_relaxed);
    word(*plan::peer_flag(lines(p), rank_)).store(epoch, std::memory_order_release);
  }
}

void ShmSegments::poison() {
  for (int p = 0; p < num_ranks_; ++p) {
    word(plan::peer_record(lines(p), num_ranks_, rank_)->poisoned)
        .store(1, std::memory_order_release);
  }
}

}  // namespace epx::detail
