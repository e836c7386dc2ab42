// tpllama TCP collectives: ranks (or hosts) that talk over the network, CPU tensors.
//
// A Mesh holds one connected TCP socket per peer (set up in Python: TCP_NODELAY, keep-alive, a
// user timeout), and runs each collective from the calling thread with the GIL released: every
// rank sends what it has to each peer and receives what the peers have, all sockets at once
// (non-blocking, one poll() loop), so a message larger than the socket buffers cannot deadlock
// and there is no I/O thread to wake (gloo hands every transfer to a thread of its own, which on a
// host with one core is a context switch each way).
//
//   all_reduce(x): every rank sends x to every peer; each rank sums the N contributions itself in
//                  rank order 0..N-1 ((x0 + x1) + x2 ..., float32 accumulation for bf16/fp16), so
//                  the result is bit-identical on every rank and equal to the shared-memory sum.
//   all_gather(x): [N, *x.shape], every rank's x.
//   broadcast(x, src): src sends, the others receive; a timeout < 0 waits without limit (an idle
//                  worker), still failing at once on poison or a closed connection.
//
// Waiting: an op first polls its sockets without sleeping for spin_us (a round trip between hosts
// takes tens of microseconds), then sleeps in poll(). Sleeping at once measurably slowed the
// compute between collectives (46 sleep/wake cycles per decode step: on a virtual machine an idle
// vCPU is halted, and it comes back with cold caches): TinyLlama's decode step on two hosts
// computed in 53 ms instead of the 46 ms of the same two ranks on one host (shared memory spins).
//
// Messages carry no headers: every rank issues the same collectives with the same shapes (as in
// any collective library). Failure: a peer that closes its socket (its process died) or resets
// it (keep-alive found its host gone) fails the op at once naming the rank; an op that waits
// longer than its timeout fails naming the ranks still owed; poison() (from any thread, e.g. a
// watchdog) makes every current and later op fail at once. After any failure the mesh is
// poisoned for good.

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

namespace {

using Clock = std::chrono::steady_clock;

struct Span {
  char* data = nullptr;
  size_t size = 0;
  size_t done = 0;
};

template <typename T>
void sum_same(T* out, const char* base, size_t stride, int world, size_t n) {
  const T* first = reinterpret_cast<const T*>(base);
  for (size_t i = 0; i < n; ++i) out[i] = first[i];
  for (int r = 1; r < world; ++r) {
    const T* src = reinterpret_cast<const T*>(base + r * stride);
    for (size_t i = 0; i < n; ++i) out[i] += src[i];
  }
}

template <typename H>
void sum_half(H* out, const char* base, size_t stride, int world, size_t n) {
  std::vector<float> acc(n);
  const H* first = reinterpret_cast<const H*>(base);
  for (size_t i = 0; i < n; ++i) acc[i] = static_cast<float>(first[i]);
  for (int r = 1; r < world; ++r) {
    const H* src = reinterpret_cast<const H*>(base + r * stride);
    for (size_t i = 0; i < n; ++i) acc[i] += static_cast<float>(src[i]);
  }
  for (size_t i = 0; i < n; ++i) out[i] = H(acc[i]);
}

class Mesh {
 public:
  Mesh(int64_t rank, std::vector<int64_t> fds, double timeout_s, double spin_us)
      : rank_(static_cast<int>(rank)), world_(static_cast<int>(fds.size())), timeout_s_(timeout_s), spin_us_(spin_us) {
    if (rank_ < 0 || rank_ >= world_) throw std::invalid_argument("tcp mesh: rank out of range");
    for (int r = 0; r < world_; ++r) {
      int fd = static_cast<int>(fds[r]);
      if ((r == rank_) != (fd < 0)) throw std::invalid_argument("tcp mesh: one socket per peer, -1 for this rank");
      fds_.push_back(fd);
    }
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_ < 0) throw std::runtime_error(std::string("tcp mesh: eventfd: ") + std::strerror(errno));
  }

  ~Mesh() { close(); }

  torch::Tensor all_reduce(torch::Tensor x, double timeout_s) {
    check(x, "all_reduce");
    const size_t bytes = x.numel() * x.element_size();
    if (world_ == 1 || bytes == 0) return x;
    scratch_.resize(bytes * world_);
    char* base = scratch_.data();
    std::memcpy(base + rank_ * bytes, x.data_ptr(), bytes);
    std::vector<Span> out(world_), in(world_);
    for (int r = 0; r < world_; ++r) {
      if (r == rank_) continue;
      out[r] = {base + rank_ * bytes, bytes, 0};
      in[r] = {base + r * bytes, bytes, 0};
    }
    exchange(out, in, timeout_s, "all_reduce");
    const size_t n = x.numel();
    switch (x.scalar_type()) {
      case at::kFloat: sum_same(x.data_ptr<float>(), base, bytes, world_, n); break;
      case at::kDouble: sum_same(x.data_ptr<double>(), base, bytes, world_, n); break;
      case at::kLong: sum_same(x.data_ptr<int64_t>(), base, bytes, world_, n); break;
      case at::kInt: sum_same(x.data_ptr<int32_t>(), base, bytes, world_, n); break;
      case at::kBFloat16: sum_half(x.data_ptr<c10::BFloat16>(), base, bytes, world_, n); break;
      case at::kHalf: sum_half(x.data_ptr<c10::Half>(), base, bytes, world_, n); break;
      default: throw std::invalid_argument(std::string("tcp all_reduce: unsupported dtype ") + c10::toString(x.scalar_type()));
    }
    return x;
  }

  torch::Tensor all_gather(torch::Tensor x, double timeout_s) {
    check(x, "all_gather");
    std::vector<int64_t> shape{world_};
    for (auto s : x.sizes()) shape.push_back(s);
    auto result = torch::empty(shape, x.options());
    const size_t bytes = x.numel() * x.element_size();
    char* base = static_cast<char*>(result.data_ptr());
    std::memcpy(base + rank_ * bytes, x.data_ptr(), bytes);
    std::vector<Span> out(world_), in(world_);
    for (int r = 0; r < world_; ++r) {
      if (r == rank_) continue;
      out[r] = {base + rank_ * bytes, bytes, 0};
      in[r] = {base + r * bytes, bytes, 0};
    }
    exchange(out, in, timeout_s, "all_gather");
    return result;
  }

  torch::Tensor broadcast(torch::Tensor x, int64_t src, double timeout_s) {
    check(x, "broadcast");
    if (src < 0 || src >= world_) throw std::invalid_argument("tcp broadcast: source rank out of range");
    const size_t bytes = x.numel() * x.element_size();
    std::vector<Span> out(world_), in(world_);
    char* p = static_cast<char*>(x.data_ptr());
    if (rank_ == src) {
      for (int r = 0; r < world_; ++r)
        if (r != rank_) out[r] = {p, bytes, 0};
    } else {
      in[src] = {p, bytes, 0};
    }
    exchange(out, in, timeout_s, "broadcast");
    return x;
  }

  void poison() {
    poisoned_.store(true);
    if (wake_ >= 0) {
      uint64_t one = 1;
      ssize_t ignored = ::write(wake_, &one, sizeof(one));
      (void)ignored;
    }
  }

  bool poisoned() const { return poisoned_.load(); }

  void close() {
    for (int& fd : fds_) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
    if (wake_ >= 0) ::close(wake_);
    wake_ = -1;
  }

  int64_t bytes_sent() const { return bytes_sent_; }
  int64_t bytes_received() const { return bytes_received_; }
  double seconds() const { return static_cast<double>(ns_) * 1e-9; }
  int64_t ops() const { return ops_; }
  double timeout_s() const { return timeout_s_; }

 private:
  void check(const torch::Tensor& x, const char* what) const {
    if (!x.device().is_cpu()) throw std::invalid_argument(std::string("tcp ") + what + ": CPU tensors only");
    if (!x.is_contiguous()) throw std::invalid_argument(std::string("tcp ") + what + ": the tensor must be contiguous");
    if (poisoned_.load()) throw std::runtime_error(std::string("tcp ") + what + ": the mesh is poisoned (a rank failed)");
    if (closed()) throw std::runtime_error(std::string("tcp ") + what + ": the mesh is closed");
  }

  bool closed() const { return wake_ < 0; }

  [[noreturn]] void fail(const std::string& msg) {
    poison();
    throw std::runtime_error(msg);
  }

  // Send out[r] to and receive in[r] from every peer r at once. timeout_s < 0: no limit.
  void exchange(std::vector<Span>& out, std::vector<Span>& in, double timeout_s, const char* what) {
    const auto t0 = Clock::now();
    const bool forever = timeout_s < 0;
    const auto deadline = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(forever ? 0 : timeout_s));
    std::vector<pollfd> pfds;
    std::vector<int> peer;
    pfds.reserve(world_ + 1);
    peer.reserve(world_ + 1);
    int64_t sent = 0, received = 0;
    while (true) {
      pfds.clear();
      peer.clear();
      for (int r = 0; r < world_; ++r) {
        if (r == rank_) continue;
        short ev = 0;
        if (out[r].done < out[r].size) ev |= POLLOUT;
        if (in[r].done < in[r].size) ev |= POLLIN;
        if (ev) {
          pfds.push_back({fds_[r], ev, 0});
          peer.push_back(r);
        }
      }
      if (pfds.empty()) break;
      pfds.push_back({wake_, POLLIN, 0});
      peer.push_back(-1);
      int wait_ms = -1;
      if (!forever) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0) fail(std::string("tcp ") + what + ": timed out after " + std::to_string(timeout_s) + " s waiting for rank(s) " + owed(out, in));
        wait_ms = static_cast<int>(std::min<int64_t>(left + 1, 1000));
      }
      if (std::chrono::duration<double, std::micro>(Clock::now() - t0).count() < spin_us_) wait_ms = 0;  // spin
      int n = ::poll(pfds.data(), pfds.size(), wait_ms);
      if (n < 0) {
        if (errno == EINTR) continue;
        fail(std::string("tcp ") + what + ": poll: " + std::strerror(errno));
      }
      if (poisoned_.load()) throw std::runtime_error(std::string("tcp ") + what + ": the mesh was poisoned (a rank failed)");
      for (size_t k = 0; k + 1 < pfds.size(); ++k) {
        const int r = peer[k];
        const short re = pfds[k].revents;
        if (!re) continue;
        if (re & POLLIN) {
          Span& s = in[r];
          ssize_t got = ::recv(fds_[r], s.data + s.done, s.size - s.done, MSG_DONTWAIT);
          if (got == 0) fail(std::string("tcp ") + what + ": rank " + std::to_string(r) + " closed the connection (its process ended)");
          if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            fail(std::string("tcp ") + what + ": receiving from rank " + std::to_string(r) + ": " + std::strerror(errno));
          if (got > 0) {
            s.done += static_cast<size_t>(got);
            received += got;
          }
        }
        if (re & POLLOUT) {
          Span& s = out[r];
          ssize_t put = ::send(fds_[r], s.data + s.done, s.size - s.done, MSG_DONTWAIT | MSG_NOSIGNAL);
          if (put < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            fail(std::string("tcp ") + what + ": sending to rank " + std::to_string(r) + ": " + std::strerror(errno));
          if (put > 0) {
            s.done += static_cast<size_t>(put);
            sent += put;
          }
        }
        if ((re & (POLLERR | POLLHUP | POLLNVAL)) && !(re & POLLIN)) {
          int err = 0;
          socklen_t len = sizeof(err);
          getsockopt(fds_[r], SOL_SOCKET, SO_ERROR, &err, &len);
          fail(std::string("tcp ") + what + ": the connection to rank " + std::to_string(r) + " failed: " +
               (err ? std::strerror(err) : "hang-up"));
        }
      }
    }
    bytes_sent_ += sent;
    bytes_received_ += received;
    ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    ++ops_;
  }

  std::string owed(const std::vector<Span>& out, const std::vector<Span>& in) const {
    std::string s;
    for (int r = 0; r < world_; ++r) {
      if (r == rank_) continue;
      if (out[r].done < out[r].size || in[r].done < in[r].size) s += (s.empty() ? "" : ", ") + std::to_string(r);
    }
    return s;
  }

  int rank_, world_;
  double timeout_s_, spin_us_;
  std::vector<int> fds_;
  int wake_ = -1;
  std::atomic<bool> poisoned_{false};
  std::vector<char> scratch_;
  int64_t bytes_sent_ = 0, bytes_received_ = 0, ns_ = 0, ops_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Mesh>(m, "Mesh")
      .def(py::init<int64_t, std::vector<int64_t>, double, double>(), py::arg("rank"), py::arg("fds"),
           py::arg("timeout_s"), py::arg("spin_us"))
      .def("all_reduce", &Mesh::all_reduce, py::call_guard<py::gil_scoped_release>())
      .def("all_gather", &Mesh::all_gather, py::call_guard<py::gil_scoped_release>())
      .def("broadcast", &Mesh::broadcast, py::call_guard<py::gil_scoped_release>())
      .def("poison", &Mesh::poison)
      .def("poisoned", &Mesh::poisoned)
      .def("close", &Mesh::close)
      .def_property_readonly("bytes_sent", &Mesh::bytes_sent)
      .def_property_readonly("bytes_received", &Mesh::bytes_received)
      .def_property_readonly("seconds", &Mesh::seconds)
      .def_property_readonly("ops", &Mesh::ops)
      .def_property_readonly("timeout_s", &Mesh::timeout_s);
}
