// tpllama shared-memory collectives for the ranks of one host (CPU tensors).
//
// Segment (POSIX shm, /dev/shm/<name>), created by rank 0, mapped by every rank:
//
//   [Header: magic, geometry, creator pid | poison word]          (own cache lines)
//   [RankState x world: seq, pid, op descriptors]                  (128 B each, no false sharing)
//   [data: buffer 0: slot rank 0 .. slot rank N-1 | buffer 1: ...] (slot_bytes each, 4 KiB aligned)
//
// Protocol. Every rank counts the operations (chunks) it has issued: op s = 1, 2, 3, ... All
// ranks issue the same sequence of ops (like any collective library). Op s uses data buffer
// b = s % 2. RankState[r].seq is the last op rank r has *published*; publishing s (a release
// store) means
//   (a) r has finished reading every op < s, and
//   (b) r's input for op s (if it has one) is in its slot of buffer s % 2.
//
//   every rank, op s:
//       wait until seq[j] >= s-1 for all j        ("pre-wait", normally already true)
//       writers (every rank in all_reduce/all_gather, the source in broadcast):
//           copy the input into slot(b, rank)
//       write its op descriptor desc[b] (kind, dtype, size), then seq[rank] = s (release)
//   readers (every rank in all_reduce/all_gather, the other ranks in broadcast):
//       wait until seq[j] >= s (acquire) for every writer j; check the writers' desc[b]
//       against its own op (a mismatch poisons the segment and raises); read buffer b.
//
// Why one barrier per op is enough (double buffering): buffer b was last used by op s-2.
// A rank overwrites slot(b, rank) and desc[b] only after every rank j has published s-1, i.e.
// (by (a)) has finished reading op s-2, so no reader can still be looking at the old contents.
// Conversely, while rank i reads op s from buffer b, no rank can write op s+2 into it: that
// writer would first need seq[i] >= s+1, and i publishes s+1 only after it is done with op s.
// A reader that sees seq[j] >= s (acquire) also sees j's op-s data (written before j's release
// store of s); seq[j] may already be s+1, but op s+1 lives in the other buffer. In an
// all_reduce every rank waits for all seq >= s before it can start op s+1, so the pre-wait of
// op s+1 (all seq >= s) is then satisfied without waiting: the only barrier is the one of the
// op itself. Broadcast sources do not wait for the receivers (they return as soon as the data
// is published); the pre-wait of their next op provides the flow control.
//
// Determinism: every rank reads all N slots and sums them itself in rank order 0..N-1
// (float32 accumulation for bf16/fp16, rounded once at the end, round-to-nearest-even), so the
// results are bit-identical on all ranks and equal to ((x0 + x1) + x2) + ... in float32.
//
// Waiting: spin with a pause instruction for spin_us, then sched_yield() until yield_us, then
// sleep sleep_us per check, and 1 ms per check after idle_ms (an idle worker waiting for its
// next command). The GIL is released once the spin phase is over (a Python watchdog thread can
// run). Every check also reads the poison word: any rank (or another process, by name) can
// poison the segment and every waiter raises at once. A rank that times out poisons the
// segment too (the op sequence is broken from then on), so the others fail fast. Waiters also
// check (every ~100 ms) that the process of the rank they wait for is still alive (not a zombie).

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TPL_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define TPL_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define TPL_CPU_RELAX() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

namespace py = pybind11;

namespace {

static_assert(std::atomic<uint64_t>::is_always_lock_free, "need lock-free 64-bit atomics");
static_assert(std::atomic<int32_t>::is_always_lock_free, "need lock-free 32-bit atomics");

constexpr uint64_t kMagic = 0x316d68736c707400ULL;  // "\0tplshm1"
constexpr uint32_t kVersion = 1;
constexpr size_t kLine = 128;  // two cache lines: the adjacent-line prefetcher pairs them

enum OpKind : uint32_t { kAllReduce = 1, kAllGather = 2, kBroadcast = 3 };
enum PoisonReason : int32_t { kManual = 1, kTimeout = 2, kDied = 3, kMismatch = 4 };

// Fixed offsets (the Python side reads magic and creator_pid to sweep stale segments).
struct Header {
  std::atomic<uint64_t> magic;  // @0, stored last by the creator (release)
  uint32_t version;             // @8
  uint32_t world;               // @12
  uint64_t slot_bytes;          // @16
  uint64_t total_bytes;         // @24
  uint64_t data_offset;         // @32
  int64_t creator_pid;          // @40
  alignas(kLine) std::atomic<int32_t> poisoned;  // 0, or a PoisonReason
  std::atomic<int32_t> poison_by;                // rank that poisoned (-1: another process)
  std::atomic<int32_t> poison_culprit;           // rank that timed out / died / mismatched
};

struct Desc {
  std::atomic<uint64_t> kind_dtype;  // kind << 32 | dtype (+ src << 48 for broadcast)
  std::atomic<uint64_t> nbytes;      // total bytes of the whole (unchunked) op
};

struct alignas(kLine) RankState {
  std::atomic<uint64_t> seq;  // last published op
  std::atomic<int64_t> pid;   // 0 until attached
  Desc desc[2];               // descriptor of the op in buffer s % 2 (checked by the readers)
};

inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
inline size_t ranks_offset() { return round_up(sizeof(Header), kLine); }
inline size_t data_offset(size_t world) { return round_up(ranks_offset() + world * sizeof(RankState), 4096); }
inline size_t total_bytes(size_t world, size_t slot) { return data_offset(world) + 2 * world * slot; }

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void sleep_us(double us) {
  struct timespec ts;
  ts.tv_sec = static_cast<time_t>(us / 1e6);
  ts.tv_nsec = static_cast<long>((us - ts.tv_sec * 1e6) * 1e3);
  nanosleep(&ts, nullptr);
}

// False if the process is gone or a zombie (exited, not yet reaped by its parent).
bool process_alive(pid_t pid) {
  if (kill(pid, 0) != 0) return errno != ESRCH;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "r");
  if (!f) return true;  // no procfs: trust kill()
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* p = std::strrchr(buf, ')');  // "pid (comm) S ..."
  return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
}

std::string shm_path(const std::string& name) {
  if (name.empty() || name.size() > 200) throw std::invalid_argument("shm segment name must have 1..200 characters");
  for (char c : name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      throw std::invalid_argument("shm segment name may only contain letters, digits, '-', '_' and '.': " + name);
  return "/" + name;
}

const char* op_name(uint32_t kind) {
  switch (kind) {
    case kAllReduce: return "all_reduce";
    case kAllGather: return "all_gather";
    case kBroadcast: return "broadcast";
  }
  return "collective";
}

// ------------------------------------------------------------------ sums in rank order

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// out[i] = ((s_0[i] + s_1[i]) + s_2[i]) + ...   (same type, in place)
template <typename T>
void sum_same(T* __restrict out, const char* base, size_t stride, int world, size_t n) {
  const T* __restrict s0 = reinterpret_cast<const T*>(base);
  const T* __restrict s1 = reinterpret_cast<const T*>(base + stride);
  for (size_t i = 0; i < n; ++i) out[i] = s0[i] + s1[i];
  for (int r = 2; r < world; ++r) {
    const T* __restrict sr = reinterpret_cast<const T*>(base + r * stride);
    for (size_t i = 0; i < n; ++i) out[i] += sr[i];
  }
}

// 16-bit floats: float32 accumulation in blocks that stay in L1, one rounding at the end.
template <typename H, typename Load, typename Store>
void sum_half(H* __restrict out, const char* base, size_t stride, int world, size_t n, Load load, Store store) {
  constexpr size_t B = 1024;
  alignas(64) float acc[B];
  for (size_t i0 = 0; i0 < n; i0 += B) {
    const size_t m = std::min(B, n - i0);
    const H* __restrict s0 = reinterpret_cast<const H*>(base) + i0;
    const H* __restrict s1 = reinterpret_cast<const H*>(base + stride) + i0;
    for (size_t i = 0; i < m; ++i) acc[i] = load(s0[i]) + load(s1[i]);
    for (int r = 2; r < world; ++r) {
      const H* __restrict sr = reinterpret_cast<const H*>(base + r * stride) + i0;
      for (size_t i = 0; i < m; ++i) acc[i] += load(sr[i]);
    }
    store(out + i0, acc, m);
  }
}

void sum_bf16(uint16_t* out, const char* base, size_t stride, int world, size_t n) {
  sum_half(out, base, stride, world, n, [](uint16_t h) { return bf16_to_f32(h); },
           [](uint16_t* o, const float* a, size_t m) {
             for (size_t i = 0; i < m; ++i) o[i] = f32_to_bf16(a[i]);
           });
}

inline float f16_to_f32(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

void sum_f16(uint16_t* out, const char* base, size_t stride, int world, size_t n) {
#if defined(__F16C__) && defined(__AVX__)
  constexpr size_t B = 1024;
  alignas(64) float acc[B];
  for (size_t i0 = 0; i0 < n; i0 += B) {
    const size_t m = std::min(B, n - i0);
    const size_t mv = m & ~size_t(7);
    for (int r = 0; r < world; ++r) {
      const uint16_t* sr = reinterpret_cast<const uint16_t*>(base + r * stride) + i0;
      size_t i = 0;
      for (; i < mv; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + i)));
        _mm256_store_ps(acc + i, r == 0 ? v : _mm256_add_ps(_mm256_load_ps(acc + i), v));
      }
      for (; i < m; ++i) acc[i] = r == 0 ? f16_to_f32(sr[i]) : acc[i] + f16_to_f32(sr[i]);
    }
    size_t i = 0;
    for (; i < mv; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i0 + i),
                       _mm256_cvtps_ph(_mm256_load_ps(acc + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < m; ++i) out[i0 + i] = c10::Half(acc[i]).x;
  }
#else
  sum_half(out, base, stride, world, n, [](uint16_t h) { return f16_to_f32(h); },
           [](uint16_t* o, const float* a, size_t m) {
             for (size_t i = 0; i < m; ++i) o[i] = c10::Half(a[i]).x;
           });
#endif
}

// ------------------------------------------------------------------ the segment

class Segment {
 public:
  Segment(const std::string& name, int64_t rank, int64_t world, int64_t slot_bytes, bool create,
          double open_timeout_s, bool check_pids)
      : name_(name), path_(shm_path(name)), rank_(static_cast<int>(rank)), world_(static_cast<int>(world)),
        check_pids_(check_pids) {
    if (world < 1 || world > 4096) throw std::invalid_argument("world_size must be in 1..4096");
    if (rank < 0 || rank >= world) throw std::invalid_argument("rank must be in 0..world_size-1");
    if (slot_bytes < 4096) throw std::invalid_argument("slot_bytes must be at least 4096");
    slot_ = round_up(static_cast<size_t>(slot_bytes), 4096);
    size_ = total_bytes(world_, slot_);
    if (create) {
      do_create();
    } else {
      do_open(open_timeout_s);
    }
    ranks_ = reinterpret_cast<RankState*>(base_ + ranks_offset());
    data_ = base_ + data_offset(world_);
    // Ops already published by this rank (0 for a fresh segment).
    seq_ = ranks_[rank_].seq.load(std::memory_order_relaxed);
    ranks_[rank_].pid.store(static_cast<int64_t>(getpid()), std::memory_order_release);
  }

  ~Segment() {
    try {
      close();
    } catch (...) {
    }
  }

  void set_wait(double spin_us, double yield_us, double nap_us, double idle_ms) {
    spin_s_ = spin_us * 1e-6;
    yield_s_ = yield_us * 1e-6;
    sleep_us_ = nap_us;
    idle_s_ = idle_ms * 1e-3;
  }

  void close() {
    if (base_) {
      munmap(base_, size_);
      base_ = nullptr;
    }
    if (owner_) unlink();
  }

  // Remove the name (the mappings stay valid). Idempotent; the creator also does it in close().
  void unlink() {
    if (owner_ && !unlinked_) {
      unlinked_ = true;
      if (shm_unlink(path_.c_str()) != 0 && errno != ENOENT)
        throw std::runtime_error("shm_unlink(" + path_ + ") failed: " + std::strerror(errno));
    }
  }

  bool closed() const { return base_ == nullptr; }

  void poison(int32_t reason, int32_t culprit) {
    live();
    poison_header(header(), rank_, reason, culprit);
  }

  // 0 if healthy, else the PoisonReason.
  int32_t poisoned() const { return base_ ? header()->poisoned.load(std::memory_order_acquire) : 0; }

  int64_t seq() const { return static_cast<int64_t>(seq_); }

  static void poison_header(Header* h, int32_t by, int32_t reason, int32_t culprit) {
    int32_t expected = 0;
    // First poisoner wins (its reason is the interesting one); culprit/by written before the flag.
    if (h->poisoned.load(std::memory_order_acquire) != 0) return;
    h->poison_by.store(by, std::memory_order_relaxed);
    h->poison_culprit.store(culprit, std::memory_order_relaxed);
    h->poisoned.compare_exchange_strong(expected, reason, std::memory_order_acq_rel);
  }

  // ---------------------------------------------------------------- collectives

  torch::Tensor all_reduce(torch::Tensor x, double timeout_s) {
    check_tensor(x, "all_reduce");
    const auto st = x.scalar_type();
    if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf && st != at::kDouble && st != at::kLong &&
        st != at::kInt)
      throw std::invalid_argument(std::string("shared-memory all_reduce: unsupported dtype ") + c10::toString(st));
    const size_t es = x.element_size();
    const size_t total = x.numel() * es;
    if (world_ == 1 || total == 0) return x;
    const size_t chunk = slot_ / es * es;
    char* p = static_cast<char*>(x.data_ptr());
    std::optional<py::gil_scoped_release> nogil;
    if (total > (64u << 10)) nogil.emplace();
    for (size_t off = 0; off < total; off += chunk) {
      const size_t n = std::min(chunk, total - off);
      const uint64_t s = ++seq_;
      char* buf = data_ + (s & 1) * world_ * slot_;
      wait_all(s - 1, kAllReduce, timeout_s, nogil);
      std::memcpy(buf + rank_ * slot_, p + off, n);
      publish(s, kAllReduce, static_cast<uint32_t>(st), total);
      wait_all(s, kAllReduce, timeout_s, nogil);
      check_desc(s, kAllReduce, static_cast<uint32_t>(st), total, -1);
      const size_t ne = n / es;
      switch (st) {
        case at::kFloat: sum_same(reinterpret_cast<float*>(p + off), buf, slot_, world_, ne); break;
        case at::kDouble: sum_same(reinterpret_cast<double*>(p + off), buf, slot_, world_, ne); break;
        case at::kLong: sum_same(reinterpret_cast<int64_t*>(p + off), buf, slot_, world_, ne); break;
        case at::kInt: sum_same(reinterpret_cast<int32_t*>(p + off), buf, slot_, world_, ne); break;
        case at::kBFloat16: sum_bf16(reinterpret_cast<uint16_t*>(p + off), buf, slot_, world_, ne); break;
        case at::kHalf: sum_f16(reinterpret_cast<uint16_t*>(p + off), buf, slot_, world_, ne); break;
        default: break;
      }
    }
    return x;
  }

  torch::Tensor all_gather(torch::Tensor x, double timeout_s) {
    check_tensor(x, "all_gather");
    std::vector<int64_t> shape{world_};
    for (auto d : x.sizes()) shape.push_back(d);
    torch::Tensor out = torch::empty(shape, x.options());
    const size_t total = x.numel() * x.element_size();
    if (total == 0) return out;
    if (world_ == 1) {
      out[0].copy_(x);
      return out;
    }
    const char* p = static_cast<const char*>(x.data_ptr());
    char* o = static_cast<char*>(out.data_ptr());
    const uint32_t dt = static_cast<uint32_t>(x.scalar_type());
    std::optional<py::gil_scoped_release> nogil;
    if (total > (64u << 10)) nogil.emplace();
    for (size_t off = 0; off < total; off += slot_) {
      const size_t n = std::min(slot_, total - off);
      const uint64_t s = ++seq_;
      char* buf = data_ + (s & 1) * world_ * slot_;
      wait_all(s - 1, kAllGather, timeout_s, nogil);
      std::memcpy(buf + rank_ * slot_, p + off, n);
      publish(s, kAllGather, dt, total);
      wait_all(s, kAllGather, timeout_s, nogil);
      check_desc(s, kAllGather, dt, total, -1);
      for (int r = 0; r < world_; ++r) std::memcpy(o + r * total + off, buf + r * slot_, n);
    }
    return out;
  }

  // timeout_s < 0: wait forever (idle workers waiting for the next command).
  torch::Tensor broadcast(torch::Tensor x, int64_t src, double timeout_s) {
    check_tensor(x, "broadcast");
    if (src < 0 || src >= world_) throw std::invalid_argument("broadcast: src must be in 0..world_size-1");
    const size_t total = x.numel() * x.element_size();
    if (world_ == 1 || total == 0) return x;
    char* p = static_cast<char*>(x.data_ptr());
    const uint32_t dt = static_cast<uint32_t>(x.scalar_type()) | static_cast<uint32_t>(src) << 16;
    std::optional<py::gil_scoped_release> nogil;
    if (total > (64u << 10)) nogil.emplace();
    for (size_t off = 0; off < total; off += slot_) {
      const size_t n = std::min(slot_, total - off);
      const uint64_t s = ++seq_;
      char* slot = data_ + (s & 1) * world_ * slot_ + src * slot_;
      if (rank_ == src) {
        wait_all(s - 1, kBroadcast, timeout_s, nogil);
        std::memcpy(slot, p + off, n);
        publish(s, kBroadcast, dt, total);
      } else {
        wait_all(s - 1, kBroadcast, timeout_s, nogil);  // our descriptor of op s-2 may still be read
        publish(s, kBroadcast, dt, total);              // no data; "done reading op s-1"
        wait_one(static_cast<int>(src), s, kBroadcast, timeout_s, nogil);
        check_desc(s, kBroadcast, dt, total, static_cast<int>(src));
        std::memcpy(p + off, slot, n);
      }
    }
    return x;
  }

  // Full barrier (an all_reduce without data).
  void barrier(double timeout_s) {
    if (world_ == 1) return;
    live();
    std::optional<py::gil_scoped_release> nogil;
    const uint64_t s = ++seq_;
    wait_all(s - 1, kAllReduce, timeout_s, nogil);
    publish(s, 0, 0, 0);
    wait_all(s, kAllReduce, timeout_s, nogil);
  }

  int64_t slot_bytes() const { return static_cast<int64_t>(slot_); }
  int64_t size() const { return static_cast<int64_t>(size_); }

 private:
  Header* header() const { return reinterpret_cast<Header*>(base_); }

  void live() const {
    if (!base_) throw std::runtime_error("shared-memory collectives: segment is closed");
  }

  void check_tensor(const torch::Tensor& x, const char* op) const {
    live();
    if (!x.device().is_cpu()) throw std::invalid_argument(std::string("shared-memory ") + op + ": tensor must be on CPU");
    if (!x.is_contiguous()) throw std::invalid_argument(std::string("shared-memory ") + op + ": tensor must be contiguous");
  }

  void do_create() {
    int fd = shm_open(path_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0)
      throw std::runtime_error("shm_open(" + path_ + ", create) failed: " + std::strerror(errno) +
                               (errno == EEXIST ? " (segment names must be unique per run)" : ""));
    if (ftruncate(fd, static_cast<off_t>(size_)) != 0) {
      int e = errno;
      ::close(fd);
      shm_unlink(path_.c_str());
      throw std::runtime_error("ftruncate of shm segment " + path_ + " failed: " + std::strerror(e));
    }
    void* m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    ::close(fd);
    if (m == MAP_FAILED) {
      shm_unlink(path_.c_str());
      throw std::runtime_error("mmap of shm segment " + path_ + " failed: " + std::strerror(e));
    }
    base_ = static_cast<char*>(m);
    owner_ = true;
    Header* h = header();  // the file is zero-filled: all counters 0, not poisoned
    h->version = kVersion;
    h->world = static_cast<uint32_t>(world_);
    h->slot_bytes = slot_;
    h->total_bytes = size_;
    h->data_offset = data_offset(world_);
    h->creator_pid = static_cast<int64_t>(getpid());
    h->magic.store(kMagic, std::memory_order_release);
  }

  void do_open(double timeout_s) {
    const auto t0 = Clock::now();
    std::string why = "not found";
    for (;;) {
      int fd = shm_open(path_.c_str(), O_RDWR, 0600);
      if (fd >= 0) {
        struct stat sb;
        if (fstat(fd, &sb) == 0 && static_cast<size_t>(sb.st_size) >= size_) {
          void* m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
          ::close(fd);
          if (m == MAP_FAILED) throw std::runtime_error("mmap of shm segment " + path_ + " failed: " + std::strerror(errno));
          base_ = static_cast<char*>(m);
          Header* h = header();
          while (h->magic.load(std::memory_order_acquire) != kMagic) {
            if (seconds_since(t0) > timeout_s) {
              close();
              throw std::runtime_error("shm segment " + path_ + " was never initialised by rank 0");
            }
            sleep_us(1000);
          }
          if (h->version != kVersion || h->world != static_cast<uint32_t>(world_) || h->slot_bytes != slot_)
            {
              std::string msg = "shm segment " + path_ + " has world_size " + std::to_string(h->world) +
                                ", slot_bytes " + std::to_string(h->slot_bytes) + " (version " +
                                std::to_string(h->version) + "); this rank expects " + std::to_string(world_) +
                                ", " + std::to_string(slot_);
              close();
              throw std::runtime_error(msg);
            }
          return;
        }
        why = "still being created";
        if (fstat(fd, &sb) == 0 && static_cast<size_t>(sb.st_size) >= sizeof(Header)) {
          // Complete but smaller than this rank expects: report the geometry it was made with.
          void* m = mmap(nullptr, sizeof(Header), PROT_READ, MAP_SHARED, fd, 0);
          if (m != MAP_FAILED) {
            const Header* h = static_cast<const Header*>(m);
            std::string msg;
            if (h->magic.load(std::memory_order_acquire) == kMagic)
              msg = "shm segment " + path_ + " has world_size " + std::to_string(h->world) + ", slot_bytes " +
                    std::to_string(h->slot_bytes) + "; this rank expects " + std::to_string(world_) + ", " +
                    std::to_string(slot_);
            munmap(m, sizeof(Header));
            if (!msg.empty()) {
              ::close(fd);
              throw std::runtime_error(msg);
            }
          }
        }
        ::close(fd);
      } else if (errno != ENOENT) {
        throw std::runtime_error("shm_open(" + path_ + ") failed: " + std::strerror(errno));
      }
      if (seconds_since(t0) > timeout_s)
        throw std::runtime_error("shm segment " + path_ + " " + why + " after " + std::to_string(timeout_s) +
                                 " s (rank 0 must create it)");
      sleep_us(1000);
    }
  }

  void publish(uint64_t s, uint32_t kind, uint32_t dtype, uint64_t nbytes) {
    Desc& d = ranks_[rank_].desc[s & 1];
    d.kind_dtype.store(static_cast<uint64_t>(kind) << 32 | dtype, std::memory_order_relaxed);
    d.nbytes.store(nbytes, std::memory_order_relaxed);
    ranks_[rank_].seq.store(s, std::memory_order_release);
  }

  // The ranks that published op s agree with this one on what op s is.
  void check_desc(uint64_t s, uint32_t kind, uint32_t dtype, uint64_t nbytes, int only) {
    const uint64_t want = static_cast<uint64_t>(kind) << 32 | dtype;
    for (int j = (only < 0 ? 0 : only); j < (only < 0 ? world_ : only + 1); ++j) {
      const Desc& d = ranks_[j].desc[s & 1];
      const uint64_t kd = d.kind_dtype.load(std::memory_order_relaxed);
      const uint64_t nb = d.nbytes.load(std::memory_order_relaxed);
      if (kd != want || nb != nbytes) {
        poison_header(header(), rank_, kMismatch, j);
        throw std::runtime_error(std::string("shared-memory ") + op_name(kind) + " mismatch: rank " +
                                 std::to_string(j) + " is in " + op_name(static_cast<uint32_t>(kd >> 32)) +
                                 " of " + std::to_string(nb) + " bytes (dtype/src code " +
                                 std::to_string(kd & 0xffffffffu) + "), rank " + std::to_string(rank_) + " in " +
                                 op_name(kind) + " of " + std::to_string(nbytes) + " bytes (code " +
                                 std::to_string(dtype) + ")");
      }
    }
  }

  // Rank with the lowest seq among those below target (only: just that rank), or -1.
  int lagging(uint64_t target, int only) const {
    if (only >= 0) return ranks_[only].seq.load(std::memory_order_acquire) >= target ? -1 : only;
    int worst = -1;
    uint64_t low = target;
    for (int j = 0; j < world_; ++j) {
      const uint64_t v = ranks_[j].seq.load(std::memory_order_acquire);
      if (v < low) {
        low = v;
        worst = j;
      }
    }
    return worst;
  }

  [[noreturn]] void raise_poisoned(uint32_t kind) {
    const Header* h = header();
    const int32_t reason = h->poisoned.load(std::memory_order_acquire);
    const int32_t by = h->poison_by.load(std::memory_order_relaxed);
    const int32_t culprit = h->poison_culprit.load(std::memory_order_relaxed);
    std::string who = by < 0 ? std::string("another process") : "rank " + std::to_string(by);
    std::string what;
    switch (reason) {
      case kTimeout: what = "rank " + std::to_string(by) + " timed out waiting for rank " + std::to_string(culprit); break;
      case kDied: what = "rank " + std::to_string(culprit) + " exited"; break;
      case kMismatch: what = "ranks issued different collectives (rank " + std::to_string(culprit) + ")"; break;
      default: what = "poison() called"; break;
    }
    throw std::runtime_error(std::string("shared-memory ") + op_name(kind) + " aborted: segment poisoned by " +
                             who + " (" + what + ")");
  }

  void wait_all(uint64_t target, uint32_t kind, double timeout_s, std::optional<py::gil_scoped_release>& nogil) {
    wait(target, -1, kind, timeout_s, nogil);
  }
  void wait_one(int r, uint64_t target, uint32_t kind, double timeout_s, std::optional<py::gil_scoped_release>& nogil) {
    wait(target, r, kind, timeout_s, nogil);
  }

  void wait(uint64_t target, int only, uint32_t kind, double timeout_s, std::optional<py::gil_scoped_release>& nogil) {
    Header* h = header();
    if (h->poisoned.load(std::memory_order_acquire)) raise_poisoned(kind);
    int r = lagging(target, only);
    if (r < 0) return;
    const auto t0 = Clock::now();
    double next_pid_check = 0.1;
    for (;;) {
      const double el = seconds_since(t0);
      if (el < spin_s_) {
        for (int k = 0; k < 16; ++k) TPL_CPU_RELAX();
      } else {
        if (!nogil) nogil.emplace();  // let a Python watchdog thread run
        if (el < yield_s_) {
          sched_yield();
        } else {
          sleep_us(el < idle_s_ ? sleep_us_ : 1000.0);
        }
      }
      r = lagging(target, only);
      if (r < 0) return;
      if (h->poisoned.load(std::memory_order_acquire)) raise_poisoned(kind);
      if (timeout_s >= 0 && el > timeout_s) {
        poison_header(h, rank_, kTimeout, r);  // the op sequence is broken: make the others fail fast
        char buf[64];
        std::snprintf(buf, sizeof buf, "%g", timeout_s);
        throw std::runtime_error(std::string("shared-memory ") + op_name(kind) + " timed out after " + buf +
                                 " s waiting for rank " + std::to_string(r));
      }
      if (check_pids_ && el > next_pid_check) {
        next_pid_check = el + 0.1;
        const int64_t pid = ranks_[r].pid.load(std::memory_order_acquire);
        if (pid > 0 && !process_alive(static_cast<pid_t>(pid))) {
          poison_header(h, rank_, kDied, r);
          throw std::runtime_error(std::string("shared-memory ") + op_name(kind) + " aborted: rank " +
                                   std::to_string(r) + " (pid " + std::to_string(pid) + ") exited");
        }
      }
    }
  }

  std::string name_, path_;
  int rank_, world_;
  bool check_pids_;
  size_t slot_ = 0, size_ = 0;
  char* base_ = nullptr;
  RankState* ranks_ = nullptr;
  char* data_ = nullptr;
  uint64_t seq_ = 0;
  bool owner_ = false, unlinked_ = false;
  double spin_s_ = 5e-6, yield_s_ = 200e-6, sleep_us_ = 50.0, idle_s_ = 0.05;  // set_wait() overrides
};

// Poison a segment by name from any process (e.g. a launcher that is not a rank).
bool poison_by_name(const std::string& name) {
  const std::string path = shm_path(name);
  int fd = shm_open(path.c_str(), O_RDWR, 0600);
  if (fd < 0) return false;
  struct stat sb;
  if (fstat(fd, &sb) != 0 || static_cast<size_t>(sb.st_size) < sizeof(Header)) {
    ::close(fd);
    return false;
  }
  void* m = mmap(nullptr, sizeof(Header), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return false;
  Header* h = static_cast<Header*>(m);
  bool ok = h->magic.load(std::memory_order_acquire) == kMagic;
  if (ok) Segment::poison_header(h, -1, kManual, -1);
  munmap(m, sizeof(Header));
  return ok;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Segment>(m, "Segment")
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, bool, double, bool>(), py::arg("name"),
           py::arg("rank"), py::arg("world_size"), py::arg("slot_bytes"), py::arg("create"),
           py::arg("open_timeout_s"), py::arg("check_pids"), py::call_guard<py::gil_scoped_release>())
      .def("set_wait", &Segment::set_wait)
      .def("all_reduce", &Segment::all_reduce)
      .def("all_gather", &Segment::all_gather)
      .def("broadcast", &Segment::broadcast)
      .def("barrier", &Segment::barrier)
      .def("poison", &Segment::poison)
      .def("poisoned", &Segment::poisoned)
      .def("unlink", &Segment::unlink)
      .def("close", &Segment::close)
      .def_property_readonly("closed", &Segment::closed)
      .def_property_readonly("seq", &Segment::seq)
      .def_property_readonly("slot_bytes", &Segment::slot_bytes)
      .def_property_readonly("size", &Segment::size);
  m.def("poison_by_name", &poison_by_name);
  m.attr("MAGIC") = py::int_(kMagic);
  m.attr("HEADER_BYTES") = py::int_(sizeof(Header));
}
