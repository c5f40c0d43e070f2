// An emulated NCCL: the subset of the NCCL C API that aha calls
// (aha_cuda_kernels::nccl), implemented on the CPU across processes (or
// threads) of one machine, for tests on machines without GPUs. Built as
// libnccl.so.2 by aha_cuda_kernels::emulate::emulated_nccl_path and loaded
// by path when AHA_EMULATED_GPU=1; the emulated driver makes device
// pointers host pointers, so the collectives read and write them directly.
//
// Transport: a star of Unix stream sockets in the abstract namespace (no
// file to clean up), named by the unique id. Rank 0 listens; every other
// rank connects to it. Each collective is one round through rank 0: every
// rank > 0 sends a header (operation, count, type, root, sequence number)
// and its data; rank 0 checks that the headers agree with its own call,
// reduces in fixed rank order 0, 1, ..., N-1 (f32 and f64 in their own
// type, bf16 accumulated in f32 and rounded once, to nearest even), and
// sends each rank its result. Results are therefore deterministic and the
// same on every rank; the bytes on the wire are not NCCL's ring schedule.
//
// Everything runs synchronously at the call (the stream argument is
// ignored, as the emulated driver runs every launch at the call).
//
// Point-to-point (ncclSend/ncclRecv, for aha's all-to-all): inside
// ncclGroupStart/ncclGroupEnd each call is queued (per thread, as NCCL keeps
// its group state); ncclGroupEnd runs the queue, per communicator, as one
// round through rank 0: every rank sends the list of its sends (peer, bytes,
// data) and receives (peer, bytes), rank 0 matches rank p's n-th receive
// from q with q's n-th send to p (the byte counts must agree), and sends
// each rank what it receives, in the order of its receive calls. A send or
// receive outside a group is a group of one. Unlike NCCL's, this round is
// communicator-wide: every rank must end a group on the communicator (with
// zero-count calls if it has nothing to move), which aha's all-to-all does.
//
// Failures: every wait (connect, accept, read, write) gives up after
// AHA_NCCL_TIMEOUT_S seconds (default 120) with ncclRemoteError; a peer
// that exits closes its socket, which is reported at once. The message,
// naming the rank, the operation and its sequence number, is kept for
// ncclGetLastError (per thread, as NCCL keeps it), printed on stderr, and the communicator's asynchronous
// error becomes sticky (ncclCommGetAsyncError), as a real communicator's
// does after a failure.

#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

extern "C" {

typedef struct {
    char internal[128];
} ncclUniqueId;

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
} ncclResult_t;

typedef enum {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;

typedef struct ncclComm* ncclComm_t;
typedef void* cudaStream_t;
}

namespace {

const char kPrefix[] = "aha-fake-nccl:";
const uint32_t kMagic = 0x4e43434cu;  // "NCCL"

enum Op : uint32_t { kAllReduce = 1, kBroadcast = 2, kAllGather = 3, kReduceScatter = 4, kSendRecv = 5 };

const char* op_name(uint32_t op) {
    switch (op) {
        case kAllReduce: return "AllReduce";
        case kBroadcast: return "Broadcast";
        case kAllGather: return "AllGather";
        case kReduceScatter: return "ReduceScatter";
        case kSendRecv: return "Send/Recv group";
        default: return "unknown operation";
    }
}

struct Header {
    uint32_t magic;
    uint32_t op;
    uint64_t count;
    uint32_t dtype;
    int32_t root;
    uint64_t seq;
};

// The last error of the calling thread, as NCCL keeps it (ncclGetLastError).
thread_local std::string g_last_error;

void set_last(const std::string& msg) { g_last_error = msg; }

double timeout_s() {
    const char* v = std::getenv("AHA_NCCL_TIMEOUT_S");
    if (v != nullptr) {
        char* end = nullptr;
        double t = std::strtod(v, &end);
        if (end != v && t > 0) return t;
    }
    return 120.0;
}

using Clock = std::chrono::steady_clock;

int ms_left(Clock::time_point deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return 0;
    return left > 1000000 ? 1000000 : static_cast<int>(left);
}

size_t type_size(uint32_t dt) {
    switch (dt) {
        case ncclInt8:
        case ncclUint8: return 1;
        case ncclFloat16:
        case ncclBfloat16: return 2;
        case ncclInt32:
        case ncclUint32:
        case ncclFloat32: return 4;
        case ncclInt64:
        case ncclUint64:
        case ncclFloat64: return 8;
        default: return 0;
    }
}

float bf16_to_f32(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

}  // namespace

struct ncclComm {
    int rank = 0;
    int nranks = 1;
    std::vector<int> fds;  // rank 0: fds[r] for r >= 1; others: fds[0] to rank 0
    uint64_t seq = 0;
    ncclResult_t async_error = ncclSuccess;
    double timeout = 120.0;
};

namespace {

ncclResult_t fail(ncclComm* c, ncclResult_t code, const std::string& msg) {
    std::string full = "emulated NCCL";
    if (c != nullptr) full += " rank " + std::to_string(c->rank) + "/" + std::to_string(c->nranks);
    full += ": " + msg;
    set_last(full);
    std::fprintf(stderr, "%s\n", full.c_str());
    if (c != nullptr) c->async_error = code;
    return code;
}

// Reads or writes exactly n bytes, or explains why not in `why`.
bool io_all(int fd, void* buf, size_t n, bool writing, double timeout, std::string& why) {
    auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000));
    char* p = static_cast<char*>(buf);
    while (n > 0) {
        pollfd pfd{fd, static_cast<short>(writing ? POLLOUT : POLLIN), 0};
        int left = ms_left(deadline);
        int r = left > 0 ? poll(&pfd, 1, left) : 0;
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            why = std::string("poll: ") + std::strerror(errno);
            return false;
        }
        if (r == 0) {
            why = "timed out after " + std::to_string(static_cast<int>(timeout)) + " s (AHA_NCCL_TIMEOUT_S)";
            return false;
        }
        ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k < 0) {
            why = std::string(writing ? "send: " : "recv: ") + std::strerror(errno) + " (did it exit?)";
            return false;
        }
        if (k == 0) {
            why = "closed the connection (did it exit?)";
            return false;
        }
        p += k;
        n -= static_cast<size_t>(k);
    }
    return true;
}

sockaddr_un address(const ncclUniqueId& id, socklen_t* len) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    const char* name = id.internal + sizeof(kPrefix) - 1;
    size_t n = strnlen(name, sizeof(id.internal) - sizeof(kPrefix));
    if (n > sizeof(a.sun_path) - 2) n = sizeof(a.sun_path) - 2;
    a.sun_path[0] = '\0';  // abstract namespace
    std::memcpy(a.sun_path + 1, name, n);
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    return a;
}

struct Hello {
    uint32_t magic;
    int32_t rank;
    int32_t nranks;
};

ncclResult_t init_root(ncclComm* c, const ncclUniqueId& id) {
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0) return fail(c, ncclSystemError, std::string("socket: ") + std::strerror(errno));
    socklen_t len;
    sockaddr_un a = address(id, &len);
    if (bind(ls, reinterpret_cast<sockaddr*>(&a), len) != 0 || listen(ls, 128) != 0) {
        std::string e = std::strerror(errno);
        close(ls);
        return fail(c, ncclSystemError, "listening on the unique id's socket: " + e + " (a unique id used twice?)");
    }
    c->fds.assign(c->nranks, -1);
    auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(c->timeout * 1000));
    int joined = 1;
    std::string why;
    while (joined < c->nranks) {
        pollfd pfd{ls, POLLIN, 0};
        int left = ms_left(deadline);
        int r = left > 0 ? poll(&pfd, 1, left) : 0;
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        int fd = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) continue;
        Hello h{};
        if (!io_all(fd, &h, sizeof h, false, c->timeout, why) || h.magic != kMagic || h.nranks != c->nranks ||
            h.rank <= 0 || h.rank >= c->nranks || c->fds[h.rank] >= 0) {
            close(fd);
            close(ls);
            for (int f : c->fds)
                if (f >= 0) close(f);
            return fail(c, ncclInvalidUsage,
                        "ncclCommInitRank: a peer sent a bad hello (rank " + std::to_string(h.rank) + " of " +
                            std::to_string(h.nranks) + "; expected a new rank of " + std::to_string(c->nranks) +
                            ") " + why);
        }
        c->fds[h.rank] = fd;
        joined++;
    }
    close(ls);
    if (joined < c->nranks) {
        std::string missing;
        for (int r = 1; r < c->nranks; r++)
            if (c->fds[r] < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        for (int f : c->fds)
            if (f >= 0) close(f);
        c->fds.clear();
        return fail(c, ncclRemoteError,
                    "ncclCommInitRank: rank(s) " + missing + " did not connect within " +
                        std::to_string(static_cast<int>(c->timeout)) + " s (AHA_NCCL_TIMEOUT_S)");
    }
    for (int r = 1; r < c->nranks; r++) {
        Hello ok{kMagic, 0, c->nranks};
        if (!io_all(c->fds[r], &ok, sizeof ok, true, c->timeout, why))
            return fail(c, ncclRemoteError, "ncclCommInitRank: rank " + std::to_string(r) + " " + why);
    }
    return ncclSuccess;
}

ncclResult_t init_peer(ncclComm* c, const ncclUniqueId& id) {
    socklen_t len;
    sockaddr_un a = address(id, &len);
    auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(c->timeout * 1000));
    int fd = -1;
    while (true) {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return fail(c, ncclSystemError, std::string("socket: ") + std::strerror(errno));
        if (connect(fd, reinterpret_cast<sockaddr*>(&a), len) == 0) break;
        close(fd);
        fd = -1;
        if (ms_left(deadline) == 0)
            return fail(c, ncclRemoteError,
                        "ncclCommInitRank: rank 0 did not accept a connection within " +
                            std::to_string(static_cast<int>(c->timeout)) + " s (AHA_NCCL_TIMEOUT_S)");
        usleep(20000);
    }
    std::string why;
    Hello h{kMagic, c->rank, c->nranks};
    Hello ok{};
    if (!io_all(fd, &h, sizeof h, true, c->timeout, why) || !io_all(fd, &ok, sizeof ok, false, c->timeout, why) ||
        ok.magic != kMagic) {
        close(fd);
        return fail(c, ncclRemoteError, "ncclCommInitRank: waiting for every rank through rank 0: " + why);
    }
    c->fds.assign(1, fd);
    return ncclSuccess;
}

bool check_comm(ncclComm* c, ncclResult_t* out) {
    if (c == nullptr) {
        *out = fail(nullptr, ncclInvalidArgument, "null communicator");
        return false;
    }
    if (c->async_error != ncclSuccess) {
        *out = fail(c, c->async_error, "the communicator already failed (see the first error); abort it");
        return false;
    }
    return true;
}

// Reduces `n` rank buffers (rank order) of `count` elements into `out`.
ncclResult_t reduce_sum(ncclComm* c, const std::vector<const void*>& in, void* out, size_t count, uint32_t dt) {
    switch (dt) {
        case ncclFloat32: {
            std::vector<float> acc(static_cast<const float*>(in[0]), static_cast<const float*>(in[0]) + count);
            for (size_t r = 1; r < in.size(); r++) {
                const float* x = static_cast<const float*>(in[r]);
                for (size_t i = 0; i < count; i++) acc[i] += x[i];
            }
            std::memcpy(out, acc.data(), count * 4);
            return ncclSuccess;
        }
        case ncclFloat64: {
            std::vector<double> acc(static_cast<const double*>(in[0]), static_cast<const double*>(in[0]) + count);
            for (size_t r = 1; r < in.size(); r++) {
                const double* x = static_cast<const double*>(in[r]);
                for (size_t i = 0; i < count; i++) acc[i] += x[i];
            }
            std::memcpy(out, acc.data(), count * 8);
            return ncclSuccess;
        }
        case ncclBfloat16: {
            std::vector<float> acc(count);
            for (size_t r = 0; r < in.size(); r++) {
                const uint16_t* x = static_cast<const uint16_t*>(in[r]);
                for (size_t i = 0; i < count; i++) acc[i] = r == 0 ? bf16_to_f32(x[i]) : acc[i] + bf16_to_f32(x[i]);
            }
            uint16_t* o = static_cast<uint16_t*>(out);
            for (size_t i = 0; i < count; i++) o[i] = f32_to_bf16(acc[i]);
            return ncclSuccess;
        }
        default:
            return fail(c, ncclInvalidArgument,
                        "the emulated NCCL reduces f32, f64 and bf16 only (data type " + std::to_string(dt) + ")");
    }
}

// One collective through rank 0. `send_bytes` is what each rank
// contributes (none but the root's for a broadcast), `recv_bytes` what each
// receives.
ncclResult_t collective(ncclComm* c, uint32_t op, const void* send, void* recv, size_t count, uint32_t dt,
                        ncclRedOp_t red, int root) {
    ncclResult_t bad;
    if (!check_comm(c, &bad)) return bad;
    size_t es = type_size(dt);
    if (es == 0) return fail(c, ncclInvalidArgument, std::string(op_name(op)) + ": unknown data type " + std::to_string(dt));
    if ((op == kAllReduce || op == kReduceScatter) && red != ncclSum)
        return fail(c, ncclInvalidArgument, std::string(op_name(op)) + ": the emulated NCCL only sums (op " +
                                                std::to_string(static_cast<int>(red)) + ")");
    if (op == kBroadcast && (root < 0 || root >= c->nranks))
        return fail(c, ncclInvalidArgument, "Broadcast: root " + std::to_string(root) + " out of range");
    if (count > 0 && (recv == nullptr || (send == nullptr && op != kBroadcast)))
        return fail(c, ncclInvalidArgument, std::string(op_name(op)) + ": null buffer");
    const int n = c->nranks;
    const uint64_t seq = ++c->seq;
    size_t send_bytes = 0, recv_bytes = 0;
    switch (op) {
        case kAllReduce: send_bytes = recv_bytes = count * es; break;
        case kBroadcast: send_bytes = recv_bytes = count * es; break;
        case kAllGather: send_bytes = count * es; recv_bytes = count * es * n; break;
        case kReduceScatter: send_bytes = count * es * n; recv_bytes = count * es; break;
    }
    const std::string what = std::string(op_name(op)) + " #" + std::to_string(seq);
    std::string why;
    if (n == 1) {
        if (recv != send) std::memmove(recv, send, recv_bytes < send_bytes ? recv_bytes : send_bytes);
        return ncclSuccess;
    }
    Header mine{kMagic, op, count, dt, root, seq};
    if (c->rank != 0) {
        int fd = c->fds[0];
        bool sends_data = op != kBroadcast || root == c->rank;
        if (!io_all(fd, &mine, sizeof mine, true, c->timeout, why) ||
            (sends_data && !io_all(fd, const_cast<void*>(send), send_bytes, true, c->timeout, why)))
            return fail(c, ncclRemoteError, what + ": sending to rank 0: rank 0 " + why);
        if (op == kBroadcast && root == c->rank) {
            if (recv != send) std::memmove(recv, send, recv_bytes);
            // The root still waits for rank 0's acknowledgement below.
            uint8_t ack = 0;
            if (!io_all(fd, &ack, 1, false, c->timeout, why))
                return fail(c, ncclRemoteError, what + ": waiting for rank 0: rank 0 " + why);
            return ncclSuccess;
        }
        if (!io_all(fd, recv, recv_bytes, false, c->timeout, why))
            return fail(c, ncclRemoteError, what + ": waiting for rank 0: rank 0 " + why);
        return ncclSuccess;
    }
    // Rank 0: every header, then every rank's data, in rank order.
    std::vector<std::vector<char>> data(n);
    std::vector<const void*> in(n, nullptr);
    in[0] = send;
    for (int r = 1; r < n; r++) {
        Header h{};
        if (!io_all(c->fds[r], &h, sizeof h, false, c->timeout, why))
            return fail(c, ncclRemoteError, what + ": waiting for rank " + std::to_string(r) + ": rank " +
                                                std::to_string(r) + " " + why);
        if (h.magic != kMagic || h.op != op || h.count != count || h.dtype != dt || h.root != root || h.seq != seq)
            return fail(c, ncclInvalidUsage,
                        what + ": rank " + std::to_string(r) + " called " + op_name(h.op) + " #" +
                            std::to_string(h.seq) + " of " + std::to_string(h.count) + " elements of type " +
                            std::to_string(h.dtype) + " (root " + std::to_string(h.root) + "); rank 0 called " +
                            op_name(op) + " of " + std::to_string(count) + " of type " + std::to_string(dt) +
                            " (root " + std::to_string(root) + ")");
        if (op != kBroadcast || root == r) {
            data[r].resize(send_bytes);
            if (send_bytes > 0 && !io_all(c->fds[r], data[r].data(), send_bytes, false, c->timeout, why))
                return fail(c, ncclRemoteError, what + ": receiving from rank " + std::to_string(r) + ": rank " +
                                                    std::to_string(r) + " " + why);
            in[r] = data[r].data();
        }
    }
    std::vector<char> result(recv_bytes);
    switch (op) {
        case kAllReduce: {
            ncclResult_t e = count > 0 ? reduce_sum(c, in, result.data(), count, dt) : ncclSuccess;
            if (e != ncclSuccess) return e;
            break;
        }
        case kBroadcast:
            if (recv_bytes > 0) std::memcpy(result.data(), in[root], recv_bytes);
            break;
        case kAllGather:
            for (int r = 0; r < n; r++)
                if (send_bytes > 0) std::memcpy(result.data() + r * send_bytes, in[r], send_bytes);
            break;
        case kReduceScatter: {
            std::vector<char> full(send_bytes);
            ncclResult_t e = count > 0 ? reduce_sum(c, in, full.data(), count * n, dt) : ncclSuccess;
            if (e != ncclSuccess) return e;
            result.assign(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(recv_bytes));
            for (int r = 1; r < n; r++)
                if (recv_bytes > 0 &&
                    !io_all(c->fds[r], full.data() + r * recv_bytes, recv_bytes, true, c->timeout, why))
                    return fail(c, ncclRemoteError, what + ": sending to rank " + std::to_string(r) + ": rank " +
                                                        std::to_string(r) + " " + why);
            if (recv_bytes > 0) std::memcpy(recv, result.data(), recv_bytes);
            return ncclSuccess;
        }
    }
    for (int r = 1; r < n; r++) {
        bool ok;
        if (op == kBroadcast && root == r) {
            uint8_t ack = 1;
            ok = io_all(c->fds[r], &ack, 1, true, c->timeout, why);
        } else {
            ok = recv_bytes == 0 || io_all(c->fds[r], result.data(), recv_bytes, true, c->timeout, why);
        }
        if (!ok)
            return fail(c, ncclRemoteError, what + ": sending to rank " + std::to_string(r) + ": rank " +
                                                std::to_string(r) + " " + why);
    }
    if (recv_bytes > 0) std::memcpy(recv, result.data(), recv_bytes);
    return ncclSuccess;
}


// One queued ncclSend (send = true) or ncclRecv.
struct P2p {
    ncclComm* comm;
    bool send;
    void* buf;
    uint64_t bytes;
    int32_t peer;
};

// What a rank tells rank 0 about one of its calls.
struct P2pEntry {
    uint32_t send;
    int32_t peer;
    uint64_t bytes;
};

thread_local int g_group_depth = 0;
thread_local std::vector<P2p> g_queue;

// Runs one communicator's queued sends and receives (see the file comment).
ncclResult_t run_p2p(ncclComm* c, const std::vector<P2p>& ops) {
    ncclResult_t bad;
    if (!check_comm(c, &bad)) return bad;
    const int n = c->nranks;
    for (const P2p& o : ops)
        if (o.peer < 0 || o.peer >= n)
            return fail(c, ncclInvalidArgument,
                        std::string(o.send ? "ncclSend" : "ncclRecv") + ": peer " + std::to_string(o.peer) +
                            " out of range");
    const uint64_t seq = ++c->seq;
    const std::string what = std::string(op_name(kSendRecv)) + " #" + std::to_string(seq);
    std::string why;
    std::vector<P2pEntry> mine;
    for (const P2p& o : ops) mine.push_back({o.send ? 1u : 0u, o.peer, o.bytes});
    // rank -> its entries and the data of its sends, concatenated.
    std::vector<std::vector<P2pEntry>> entries(n);
    std::vector<std::vector<char>> sent(n);
    auto pack_own = [&](std::vector<char>& out) {
        for (const P2p& o : ops)
            if (o.send && o.bytes > 0) {
                const char* b = static_cast<const char*>(o.buf);
                out.insert(out.end(), b, b + o.bytes);
            }
    };
    if (c->rank != 0) {
        int fd = c->fds[0];
        Header h{kMagic, kSendRecv, static_cast<uint64_t>(mine.size()), 0, 0, seq};
        std::vector<char> data;
        pack_own(data);
        if (!io_all(fd, &h, sizeof h, true, c->timeout, why) ||
            (!mine.empty() && !io_all(fd, mine.data(), mine.size() * sizeof(P2pEntry), true, c->timeout, why)) ||
            (!data.empty() && !io_all(fd, data.data(), data.size(), true, c->timeout, why)))
            return fail(c, ncclRemoteError, what + ": sending to rank 0: rank 0 " + why);
        uint64_t status = 0;
        if (!io_all(fd, &status, sizeof status, false, c->timeout, why))
            return fail(c, ncclRemoteError, what + ": waiting for rank 0: rank 0 " + why);
        if (status != 0)
            return fail(c, ncclInvalidUsage,
                        what + ": rank 0 found sends and receives that do not match (its error names them)");
        for (const P2p& o : ops)
            if (!o.send && o.bytes > 0 && !io_all(fd, o.buf, o.bytes, false, c->timeout, why))
                return fail(c, ncclRemoteError, what + ": waiting for rank 0: rank 0 " + why);
        return ncclSuccess;
    }
    entries[0] = mine;
    pack_own(sent[0]);
    for (int r = 1; r < n; r++) {
        Header h{};
        if (!io_all(c->fds[r], &h, sizeof h, false, c->timeout, why))
            return fail(c, ncclRemoteError, what + ": waiting for rank " + std::to_string(r) + ": rank " +
                                                std::to_string(r) + " " + why);
        if (h.magic != kMagic || h.op != kSendRecv || h.seq != seq)
            return fail(c, ncclInvalidUsage,
                        what + ": rank " + std::to_string(r) + " called " + op_name(h.op) + " #" +
                            std::to_string(h.seq) + "; rank 0 ended a send/receive group");
        entries[r].resize(h.count);
        uint64_t total = 0;
        if (h.count > 0 &&
            !io_all(c->fds[r], entries[r].data(), h.count * sizeof(P2pEntry), false, c->timeout, why))
            return fail(c, ncclRemoteError, what + ": receiving from rank " + std::to_string(r) + ": rank " +
                                                std::to_string(r) + " " + why);
        for (const P2pEntry& e : entries[r])
            if (e.send) total += e.bytes;
        sent[r].resize(total);
        if (total > 0 && !io_all(c->fds[r], sent[r].data(), total, false, c->timeout, why))
            return fail(c, ncclRemoteError, what + ": receiving from rank " + std::to_string(r) + ": rank " +
                                                std::to_string(r) + " " + why);
    }
    // Where each (from, to) send sits in `from`'s data, in call order.
    struct Slot {
        uint64_t offset, bytes;
    };
    std::vector<std::vector<std::vector<Slot>>> sends(n, std::vector<std::vector<Slot>>(n));
    for (int r = 0; r < n; r++) {
        uint64_t off = 0;
        for (const P2pEntry& e : entries[r])
            if (e.send) {
                if (e.peer < 0 || e.peer >= n)
                    return fail(c, ncclInvalidArgument,
                                what + ": rank " + std::to_string(r) + " sends to peer " + std::to_string(e.peer));
                sends[r][e.peer].push_back({off, e.bytes});
                off += e.bytes;
            }
    }
    // Each rank's receives, matched in order.
    std::string mismatch;
    std::vector<std::vector<char>> out(n);
    std::vector<std::vector<size_t>> used(n, std::vector<size_t>(n, 0));
    for (int to = 0; to < n && mismatch.empty(); to++)
        for (const P2pEntry& e : entries[to]) {
            if (e.send) continue;
            int from = e.peer;
            if (from < 0 || from >= n) {
                mismatch = "rank " + std::to_string(to) + " receives from peer " + std::to_string(from);
                break;
            }
            size_t k = used[from][to]++;
            if (k >= sends[from][to].size()) {
                mismatch = "rank " + std::to_string(to) + "'s receive #" + std::to_string(k + 1) + " from rank " +
                           std::to_string(from) + " has no matching send";
                break;
            }
            const Slot& s = sends[from][to][k];
            if (s.bytes != e.bytes) {
                mismatch = "rank " + std::to_string(from) + " sends " + std::to_string(s.bytes) + " bytes to rank " +
                           std::to_string(to) + ", which receives " + std::to_string(e.bytes);
                break;
            }
            const char* b = sent[from].data() + s.offset;
            out[to].insert(out[to].end(), b, b + s.bytes);
        }
    for (int from = 0; from < n && mismatch.empty(); from++)
        for (int to = 0; to < n; to++)
            if (used[from][to] != sends[from][to].size()) {
                mismatch = "rank " + std::to_string(from) + " sends " + std::to_string(sends[from][to].size()) +
                           " message(s) to rank " + std::to_string(to) + ", which receives " +
                           std::to_string(used[from][to]);
                break;
            }
    uint64_t status = mismatch.empty() ? 0 : 1;
    for (int r = 1; r < n; r++) {
        bool ok = io_all(c->fds[r], &status, sizeof status, true, c->timeout, why) &&
                  (status != 0 || out[r].empty() || io_all(c->fds[r], out[r].data(), out[r].size(), true, c->timeout, why));
        if (!ok)
            return fail(c, ncclRemoteError, what + ": sending to rank " + std::to_string(r) + ": rank " +
                                                std::to_string(r) + " " + why);
    }
    if (!mismatch.empty()) return fail(c, ncclInvalidUsage, what + ": " + mismatch);
    uint64_t off = 0;
    for (const P2p& o : ops)
        if (!o.send && o.bytes > 0) {
            std::memcpy(o.buf, out[0].data() + off, o.bytes);
            off += o.bytes;
        }
    return ncclSuccess;
}

// Runs every queued call, one round per communicator in the order each
// first appears; the queue is emptied whatever happens.
ncclResult_t flush_queue() {
    std::vector<P2p> q;
    q.swap(g_queue);
    std::vector<ncclComm*> comms;
    for (const P2p& o : q) {
        bool seen = false;
        for (ncclComm* c : comms) seen = seen || c == o.comm;
        if (!seen) comms.push_back(o.comm);
    }
    ncclResult_t first = ncclSuccess;
    for (ncclComm* c : comms) {
        std::vector<P2p> mine;
        for (const P2p& o : q)
            if (o.comm == c) mine.push_back(o);
        ncclResult_t r = run_p2p(c, mine);
        if (first == ncclSuccess) first = r;
    }
    return first;
}

ncclResult_t queue_p2p(bool send, void* buf, size_t count, ncclDataType_t dt, int peer, ncclComm_t comm) {
    const char* name = send ? "ncclSend" : "ncclRecv";
    if (comm == nullptr) return fail(nullptr, ncclInvalidArgument, std::string(name) + ": null communicator");
    size_t es = type_size(dt);
    if (es == 0) return fail(comm, ncclInvalidArgument, std::string(name) + ": unknown data type " + std::to_string(dt));
    if (count > 0 && buf == nullptr) return fail(comm, ncclInvalidArgument, std::string(name) + ": null buffer");
    g_queue.push_back({comm, send, buf, static_cast<uint64_t>(count * es), peer});
    return g_group_depth > 0 ? ncclSuccess : flush_queue();
}

void close_all(ncclComm* c) {
    for (int f : c->fds)
        if (f >= 0) close(f);
    c->fds.clear();
}

}  // namespace

extern "C" {

// Lets aha tell the emulated library from a real one.
int aha_fake_nccl() { return 1; }

ncclResult_t ncclGetVersion(int* version) {
    if (version == nullptr) return ncclInvalidArgument;
    *version = 22805;  // reports itself as NCCL 2.28.5
    return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

const char* ncclGetLastError(ncclComm_t) { return g_last_error.c_str(); }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (id == nullptr) return ncclInvalidArgument;
    std::memset(id->internal, 0, sizeof id->internal);
    std::random_device rd;
    uint64_t r = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    auto now = std::chrono::system_clock::now().time_since_epoch().count();
    std::snprintf(id->internal, sizeof id->internal, "%saha-nccl-%d-%llx-%llx", kPrefix, static_cast<int>(getpid()),
                  static_cast<unsigned long long>(now), static_cast<unsigned long long>(r));
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (comm == nullptr) return fail(nullptr, ncclInvalidArgument, "ncclCommInitRank: null comm");
    *comm = nullptr;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail(nullptr, ncclInvalidArgument,
                    "ncclCommInitRank: rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    if (std::strncmp(id.internal, kPrefix, sizeof(kPrefix) - 1) != 0)
        return fail(nullptr, ncclInvalidArgument, "ncclCommInitRank: the unique id is not the emulated NCCL's");
    auto* c = new ncclComm();
    c->rank = rank;
    c->nranks = nranks;
    c->timeout = timeout_s();
    ncclResult_t r = nranks == 1 ? ncclSuccess : (rank == 0 ? init_root(c, id) : init_peer(c, id));
    if (r != ncclSuccess) {
        close_all(c);
        delete c;
        return r;
    }
    *comm = c;
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm == nullptr) return ncclSuccess;
    close_all(comm);
    delete comm;
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    if (comm == nullptr || count == nullptr) return ncclInvalidArgument;
    *count = comm->nranks;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    if (comm == nullptr || rank == nullptr) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* err) {
    if (comm == nullptr || err == nullptr) return ncclInvalidArgument;
    *err = comm->async_error;
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t dt, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t) {
    return collective(comm, kAllReduce, send, recv, count, dt, op, 0);
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t dt, int root,
                           ncclComm_t comm, cudaStream_t) {
    return collective(comm, kBroadcast, send, recv, count, dt, ncclSum, root);
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t dt, ncclComm_t comm,
                           cudaStream_t) {
    return collective(comm, kAllGather, send, recv, sendcount, dt, ncclSum, 0);
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t dt, ncclRedOp_t op,
                               ncclComm_t comm, cudaStream_t) {
    return collective(comm, kReduceScatter, send, recv, recvcount, dt, op, 0);
}

ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t dt, int peer, ncclComm_t comm, cudaStream_t) {
    return queue_p2p(true, const_cast<void*>(send), count, dt, peer, comm);
}

ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t dt, int peer, ncclComm_t comm, cudaStream_t) {
    return queue_p2p(false, recv, count, dt, peer, comm);
}

ncclResult_t ncclGroupStart() {
    g_group_depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
    if (g_group_depth <= 0) return fail(nullptr, ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--g_group_depth > 0) return ncclSuccess;
    return flush_queue();
}

}  // extern "C"
