// The emulator's runtime (see cuda_emu.h): the kernel table, the scheduler that plays a
// block's threads, the block and warp barriers, and the C ABI the Rust side loads.
//
// A block's threads are fibers (ucontext) on the launching thread, not OS threads: a
// barrier is then a switch back to the scheduler (tens of nanoseconds) instead of a
// futex wake-up per thread, which made whole-model tests minutes long. The scheduler
// resumes every runnable fiber in turn; a fiber runs until it finishes or waits at
// `__syncthreads` (released when every live thread of the block waits there) or at a
// warp exchange (released when every live thread of its warp does). A thread that
// returned no longer holds a barrier up, as an exited GPU thread.
#include "cuda_emu.h"

#include <ucontext.h>

#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local uint3 blockDim;
thread_local uint3 gridDim;

namespace cairn_emu {

struct Kernel {
    Entry entry;
    unsigned arity;
};

static std::map<std::string, Kernel>& table() {
    static std::map<std::string, Kernel> t;
    return t;
}

Register::Register(const char* name, Entry e, unsigned arity) { table()[name] = Kernel{e, arity}; }

// Each fiber's stack: the kernels keep small per-thread arrays (a row's U, a tile's
// accumulators), far below this.
constexpr size_t STACK = 128 * 1024;

enum class Wait { Ready, Block, Warp, Done };

struct Fiber {
    ucontext_t ctx;
    uint3 idx;
    Wait wait;
};

class Scheduler {
  public:
    // Run every block of the launch; false if its threads deadlocked (a barrier some
    // live thread never reaches).
    bool run(Entry entry, void** args, uint3 grid, uint3 block) {
        entry_ = entry;
        args_ = args;
        unsigned n = block.x * block.y * block.z;
        while (stacks_.size() < n) stacks_.emplace_back(new char[STACK]);
        fibers_.resize(n);
        slots_.assign(n, 0);
        blockDim = block;
        gridDim = grid;
        for (unsigned z = 0; z < grid.z; z++) {
            for (unsigned y = 0; y < grid.y; y++) {
                for (unsigned x = 0; x < grid.x; x++) {
                    blockIdx = uint3{x, y, z};
                    if (!run_block(n, block)) return false;
                }
            }
        }
        return true;
    }

    void wait(Wait w) {
        fibers_[cur_].wait = w;
        swapcontext(&fibers_[cur_].ctx, &sched_);
    }

    uint64_t exchange(uint64_t mine, unsigned src) {
        unsigned base = cur_ / 32 * 32;
        slots_[cur_] = mine;
        wait(Wait::Warp);
        uint64_t v = slots_[base + src % 32];
        // Nobody overwrites a slot before every lane has read.
        wait(Wait::Warp);
        return v;
    }

    unsigned tid() const { return cur_; }

  private:
    static void start() {
        Scheduler& s = *current_;
        s.entry_(s.args_);
        s.fibers_[s.cur_].wait = Wait::Done;
        // Returning switches to uc_link: the scheduler.
    }

    bool run_block(unsigned n, uint3 block) {
        for (unsigned i = 0; i < n; i++) {
            Fiber& f = fibers_[i];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks_[i].get();
            f.ctx.uc_stack.ss_size = STACK;
            f.ctx.uc_link = &sched_;
            makecontext(&f.ctx, &Scheduler::start, 0);
            f.idx = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
            f.wait = Wait::Ready;
        }
        current_ = this;
        for (;;) {
            for (unsigned i = 0; i < n; i++) {
                if (fibers_[i].wait != Wait::Ready) continue;
                cur_ = i;
                threadIdx = fibers_[i].idx;
                swapcontext(&sched_, &fibers_[i].ctx);
            }
            if (!release(n)) return live(0, n) == 0;
        }
    }

    unsigned live(unsigned from, unsigned to) const {
        unsigned c = 0;
        for (unsigned i = from; i < to; i++) c += fibers_[i].wait != Wait::Done;
        return c;
    }

    // Wake the threads whose barrier every live participant has reached; false if none.
    bool release(unsigned n) {
        bool woke = false;
        for (unsigned w = 0; w < n; w += 32) {
            unsigned end = w + 32 < n ? w + 32 : n;
            bool all = true, any = false;
            for (unsigned i = w; i < end; i++) {
                Wait s = fibers_[i].wait;
                if (s == Wait::Done) continue;
                any = true;
                all = all && s == Wait::Warp;
            }
            if (any && all) {
                for (unsigned i = w; i < end; i++) {
                    if (fibers_[i].wait == Wait::Warp) fibers_[i].wait = Wait::Ready;
                }
                woke = true;
            }
        }
        if (woke) return true;
        bool all = true, any = false;
        for (unsigned i = 0; i < n; i++) {
            if (fibers_[i].wait == Wait::Done) continue;
            any = true;
            all = all && fibers_[i].wait == Wait::Block;
        }
        if (any && all) {
            for (unsigned i = 0; i < n; i++) {
                if (fibers_[i].wait == Wait::Block) fibers_[i].wait = Wait::Ready;
            }
            return true;
        }
        return false;
    }

    static thread_local Scheduler* current_;
    Entry entry_ = nullptr;
    void** args_ = nullptr;
    ucontext_t sched_;
    unsigned cur_ = 0;
    std::vector<Fiber> fibers_;
    std::vector<std::unique_ptr<char[]>> stacks_;
    std::vector<uint64_t> slots_;
};

thread_local Scheduler* Scheduler::current_ = nullptr;

// One scheduler: launches are serialised (`__shared__` arrays are process-wide).
static Scheduler& scheduler() {
    static Scheduler* s = new Scheduler;
    return *s;
}

void sync_block() { scheduler().wait(Wait::Block); }

uint64_t warp_exchange(uint64_t mine, unsigned src) { return scheduler().exchange(mine, src); }

unsigned lane_id() { return scheduler().tid() % 32; }

} // namespace cairn_emu

// Launch `kernel` as cuLaunchKernel would (args[i] points at argument i) and wait for
// it. 0 on success, -1 for a kernel not in the table, -2 for a block of no threads or
// more than 1024, or an empty grid, -3 when the block's threads deadlock at a barrier.
extern "C" int cairn_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], void** args) {
    static std::mutex launch;
    auto& t = cairn_emu::table();
    auto it = t.find(kernel);
    if (it == t.end()) return -1;
    unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return -2;
    std::lock_guard<std::mutex> l(launch);
    bool ok = cairn_emu::scheduler().run(it->second.entry, args, uint3{grid[0], grid[1], grid[2]},
                                         uint3{block[0], block[1], block[2]});
    return ok ? 0 : -3;
}

// The number of parameters of `kernel`, or -1 when it is not in the table (the host
// checks its argument list against it before a launch).
extern "C" int cairn_emu_arity(const char* kernel) {
    auto& t = cairn_emu::table();
    auto it = t.find(kernel);
    return it == t.end() ? -1 : (int)it->second.arity;
}
