/*
 * runtime.cpp — the SIMT emulator: runs CUDA C++ kernels (compiled by g++ with -DLK_BACKEND_EMU) on the CPU.
 *
 * Model (DESIGN.md §3):
 *  - One fiber per CUDA thread; all fibers of a block run on one OS thread (a "worker"); a worker runs
 *    one block at a time. Blocks are taken from a per-launch atomic counter by up to LK_EMU_WORKERS
 *    workers (default min(cores, 4), clamped to 64): the calling thread plus helper threads from a
 *    process-wide pool that is created lazily and reused by every launch of every host thread (no thread
 *    is created per launch). The calling thread always runs blocks of its own launch, so concurrent launches
 *    from many host threads all progress even when every helper is busy. The first error stops the other
 *    workers taking blocks; the launch returns it and its message lands in the calling thread's
 *    error_message().
 *  - Scheduling is cooperative: a fiber runs until it blocks (__syncthreads, a warp collective) or exits;
 *    then the next runnable fiber is chosen by LK_EMU_ORDER (fwd: lowest linear id, rev: highest,
 *    rand: uniform, seeded by LK_EMU_SEED and the linear block id). lk_emu_set_schedule() overrides both
 *    per host thread (they are then not even parsed). Spin-waits on memory never yield and therefore hang
 *    (no preemption).
 *  - __syncthreads releases when every live thread is at a barrier (exited threads count as arrived).
 *    LK_EMU_STRICT=1 (default) also requires one call site per barrier episode.
 *  - Warp collectives: each lane posts its operands and blocks; the lane completing the group computes for
 *    all. As PTX shfl.sync / vote.sync / bar.warp.sync (sm_70+), a collective waits only for the non-exited
 *    lanes of its mask (the lanes a partial last warp lacks count as exited): it completes when the lanes
 *    that arrived are mask & ~exited & existing, also when the last awaited lane exits instead of arriving.
 *    Exited lanes contribute 0 to ballot/any, __all_sync looks at the participating lanes only, and a shuffle
 *    reading an exited lane or a lane outside the mask gets poison (~0). mma.sync and ldmatrix (.aligned)
 *    take all 32 lanes: an exited or missing lane there is an error. Also errors: a calling lane not in its
 *    own mask; lanes of one warp waiting at collectives with the same mask must be at the same one (kind,
 *    call site, operands); two pending collectives each waiting for lanes blocked in the other; a lane named
 *    by a pending collective reaching __syncthreads, or a mask naming lanes waiting at __syncthreads.
 *    Misuse → LK_ERR_EMU_WARP. Nothing runnable → LK_ERR_EMU_DEADLOCK (the message lists who waits where).
 *  - cp.async copies queue per thread and land at the matching wait; the destination reads 0xFF until
 *    then. A thread exiting with copies never waited for is LK_ERR_EMU_ASYNC_COPY in strict mode (the
 *    default); LK_EMU_STRICT=0 drops them. Dynamic shared memory is 0xFF at every block start.
 *  - Stacks: 64 KiB mmap'd per fiber with 16 KiB of PROT_NONE guard below, kept per worker across launches;
 *    when more than kStackCacheCap stacks are mapped process-wide after a launch, the worker unmaps its own
 *    (each stack is 2 of vm.max_map_count's 65530 mappings), and a helper joins a launch only while the
 *    process stays under kHelperStackBudget. Emulator code is compiled with -fstack-clash-protection, so a
 *    frame larger than the guard probes it rather than jumping over it into a neighbour. A guard-page hit
 *    by the running fiber is caught by the SIGSEGV handler (on an alternate stack), which restores the
 *    signal mask and switches to the worker's scheduler context as fail() does: the launch returns
 *    LK_ERR_EMU_STACK_OVERFLOW ("stack overflow in block (x,y,z) thread (x,y,z)") and the process goes on
 *    (unless the overflow happened inside a libc call holding a lock). Any other SIGSEGV is passed to the
 *    previous handler or the default action (ASan reports, core dumps).
 *  - x86-64: hand-written context switch (callee-saved registers, MXCSR, x87 control word); elsewhere (or
 *    with -DLK_EMU_FORCE_UCONTEXT) ucontext. ASan builds annotate every switch.
 *
 * Blind spots (what the emulator does NOT check or model):
 *  - Static __shared__ is `static thread_local` (emu.cuh): it is not poisoned between blocks, ASan does not
 *    see overruns inside it (only past the whole TLS block), and it does not count toward the shared-memory
 *    limit; only dynamic shared memory is poisoned and limited.
 *  - The shared-memory limit is sm_90's 227 KiB per block; sm_80 allows only 163 KiB (sm_86/89: 99 KiB), so
 *    a launch the emulator accepts can fail on an older GPU.
 *  - float atomicAdd always flushes subnormal inputs and results to zero, as the PTX ISA specifies for
 *    global-memory atom.add.f32; whether a shared-memory float atomic on a given GPU does the same has not
 *    been verified here (kernels relying on subnormal sums are suspect either way).
 *  - Memory is sequentially consistent and fibers switch only at barriers/collectives: races without a
 *    barrier show up only as schedule-dependent results, and memory-ordering bugs (missing fences) do not.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h> /* also for the interrupted stack pointer in the SIGSEGV handler */
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "../lora_kernels.h"
#include "emu.cuh"

#if !defined(__x86_64__) || defined(LK_EMU_FORCE_UCONTEXT)
#define LK_EMU_UCONTEXT 1
#else
#define LK_EMU_UCONTEXT 0
#endif

#if defined(__SANITIZE_ADDRESS__)
#define LK_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LK_EMU_ASAN 1
#endif
#endif
#ifndef LK_EMU_ASAN
#define LK_EMU_ASAN 0
#endif
#if LK_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

/* ------------------------------------------------------------------------------------------------
 * x86-64 context switch: lk_emu_ctx_swap(void** save_sp, void* new_sp). Saves rbp rbx r12-r15, MXCSR
 * and the x87 control word on the current stack, stores rsp, loads new_sp and restores the same. */
#if !LK_EMU_UCONTEXT
asm(R"(
    .pushsection .text
    .p2align 4
    .globl lk_emu_ctx_swap
    .hidden lk_emu_ctx_swap
    .type lk_emu_ctx_swap,@function
lk_emu_ctx_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lk_emu_ctx_swap,.-lk_emu_ctx_swap

    .p2align 4
    .globl lk_emu_fiber_start
    .hidden lk_emu_fiber_start
    .type lk_emu_fiber_start,@function
lk_emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size lk_emu_fiber_start,.-lk_emu_fiber_start
    .popsection
)");
extern "C" void lk_emu_ctx_swap(void** save_sp, void* new_sp);
extern "C" void lk_emu_fiber_start();
#endif

namespace lk {
namespace emu {

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;
__thread unsigned char* tl_dynamic_smem;

namespace {
thread_local char tl_error_message[2048];
}

int set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_error_message, sizeof tl_error_message, fmt, ap);
  va_end(ap);
  return code;
}
const char* error_message() { return tl_error_message; }

namespace detail {
namespace {

constexpr size_t kStackSize = 64 * 1024;
constexpr size_t kGuardSize = 16 * 1024; /* a few pages: frames larger than one page still hit it */
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kMaxSmem = 227 * 1024;
constexpr int kMaxThreads = 1024;
constexpr uint64_t kMaxWorkers = 64;     /* LK_EMU_WORKERS is clamped to this */
/* Fiber stacks take 2 mappings each (guard + stack) out of vm.max_map_count (65530 by default). */
constexpr size_t kStackCacheCap = 4096;     /* stacks kept mapped process-wide when idle (after a launch) */
constexpr size_t kHelperStackBudget = 16384; /* a helper joins a launch only if mapped stacks stay below this */
constexpr int kMaxWarps = kMaxThreads / 32;

enum Order { ORDER_FWD, ORDER_REV, ORDER_RAND };
enum FState : uint8_t { F_RUN, F_BAR, F_WARP, F_DONE };

const char* const kKindName[K_COUNT] = {"__shfl_sync",   "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                        "__ballot_sync", "__any_sync",     "__all_sync",       "__syncwarp",
                                        "mma.sync f16",  "mma.sync bf16",  "ldmatrix",         "__activemask"};

struct Stack {
  char* map = nullptr; /* [map, lo) guard, [lo, hi) usable */
  char* lo = nullptr;
  char* hi = nullptr;
};

struct Ctx {
#if LK_EMU_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  const void* stack_bottom = nullptr; /* for ASan */
  size_t stack_size = 0;
  void* fake = nullptr;
};

struct Copy {
  void* dst;
  const void* src;
  uint32_t size;
  uint32_t group;
  const char* file;
  int line;
};

struct Fiber {
  Ctx ctx;
  Stack stack;
  bool used = false; /* ran since its stack was last reset */
  uint3 tid{0, 0, 0};
  uint32_t linear = 0, lane = 0, warp = 0;
  FState state = F_RUN;
  int wkind = -1; /* what it waits at, for messages: -1 = __syncthreads, else CollKind */
  const char* wfile = "";
  int wline = 0;
  std::vector<Copy> copies;
  uint32_t commits = 0;
};

struct Group {
  uint32_t mask, arrived;
  int kind, extra;
  const char* file;
  int line;
};
struct Slot {
  uint64_t in, out;
  int arg, width;
  const void* p[3];
  void* pout;
};
struct Warp {
  uint32_t exists, exited, at_bar;
  uint32_t am_waiting; /* lanes waiting in __activemask */
  int ngroups;
  Group groups[32];
  Slot slot[32];
};

struct Launch {
  void (*thunk)(void*);
  void* args;
  dim3 grid, block;
  size_t smem;
  uint32_t nthreads;
  uint64_t total;
  int order;
  uint64_t seed;
  bool strict;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  int err = 0;
  std::string msg;
  /* guarded by the helper pool's mutex */
  int want = 0;    /* helper slots still open (the launch is in the pool's queue while > 0) */
  int helpers = 0; /* helpers working on it */
  std::condition_variable helpers_done;
};

struct Worker {
  Ctx main;
  bool main_known = false;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  Launch* L = nullptr;
  uint3 bidx{0, 0, 0};
  uint64_t runnable[kMaxThreads / 64]; /* bitset: lowest/highest for fwd/rev */
  uint16_t rlist[kMaxThreads];          /* the same set, unordered, for O(1) random picks */
  uint16_t rpos[kMaxThreads];
  int nrunnable = 0;
  int nthreads = 0, nlive = 0, nwarps = 0;
  int bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0;
  Fiber* bar_first = nullptr;
  std::vector<Fiber*> bar_waiters;
  Warp warps[kMaxWarps];
  uint64_t rng = 0;
  int err = 0;
  char msg[1536];
};

thread_local Worker* tl_w = nullptr;

/* ---------------------------------------------------------------------------------------------- */
inline bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || strcmp(f1, f2) == 0);
}

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline void set_runnable(Worker* w, Fiber* f) {
  w->runnable[f->linear >> 6] |= 1ull << (f->linear & 63);
  w->rpos[f->linear] = static_cast<uint16_t>(w->nrunnable);
  w->rlist[w->nrunnable++] = static_cast<uint16_t>(f->linear);
}
inline void clear_runnable(Worker* w, Fiber* f) {
  w->runnable[f->linear >> 6] &= ~(1ull << (f->linear & 63));
  const uint16_t last = w->rlist[--w->nrunnable];
  const uint16_t pos = w->rpos[f->linear];
  w->rlist[pos] = last;
  w->rpos[last] = pos;
}

Fiber* pick(Worker* w) {
  if (w->nrunnable == 0) return nullptr;
  const int nwords = (w->nthreads + 63) >> 6;
  switch (w->L->order) {
    case ORDER_FWD:
      for (int i = 0; i < nwords; ++i)
        if (w->runnable[i]) return &w->fibers[i * 64 + __builtin_ctzll(w->runnable[i])];
      break;
    case ORDER_REV:
      for (int i = nwords - 1; i >= 0; --i)
        if (w->runnable[i]) return &w->fibers[i * 64 + 63 - __builtin_clzll(w->runnable[i])];
      break;
    default: {
      const uint64_t r = ((splitmix64(w->rng) >> 32) * static_cast<uint64_t>(w->nrunnable)) >> 32; /* < nrunnable */
      return &w->fibers[w->rlist[r]];
    }
  }
  return nullptr; /* unreachable: nrunnable > 0 */
}

/* ---------------------------------------------------------------------------------------------- */
void fiber_entry(Fiber* f);

#if LK_EMU_ASAN
void asan_finish(Worker* w, void* fake) {
  const void* ob = nullptr;
  size_t os = 0;
  __sanitizer_finish_switch_fiber(fake, &ob, &os);
  if (!w->main_known) { /* the first switch a worker makes is from its own stack into a fiber */
    w->main.stack_bottom = ob;
    w->main.stack_size = os;
    w->main_known = true;
  }
}
#endif

inline void switch_to(Worker* w, Ctx* from, Ctx* to, bool from_exiting) {
#if LK_EMU_ASAN
  __sanitizer_start_switch_fiber(from_exiting ? nullptr : &from->fake, to->stack_bottom, to->stack_size);
#else
  (void)w;
  (void)from_exiting;
#endif
#if LK_EMU_UCONTEXT
  swapcontext(&from->uc, &to->uc);
#else
  lk_emu_ctx_swap(&from->sp, to->sp);
#endif
#if LK_EMU_ASAN
  asan_finish(w, from->fake);
#endif
}

#if LK_EMU_UCONTEXT
void uctx_entry(unsigned lo, unsigned hi) {
  fiber_entry(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | static_cast<uintptr_t>(lo)));
}
#endif

bool ctx_init(Fiber* f) {
  Stack& s = f->stack;
#if LK_EMU_ASAN
  if (f->used) {
    /* Frames that never returned (an exit path, an abandoned fiber) left their redzones poisoned. */
#if LK_EMU_UCONTEXT
    __asan_unpoison_memory_region(s.lo, static_cast<size_t>(s.hi - s.lo));
#else
    char* const sp = static_cast<char*>(f->ctx.sp);
    char* const from = sp && sp > s.lo + 512 && sp <= s.hi ? sp - 512 : s.lo; /* null: an overflow */
    __asan_unpoison_memory_region(from, static_cast<size_t>(s.hi - from));
#endif
  }
#endif
  f->used = false;
  f->ctx.stack_bottom = s.lo;
  f->ctx.stack_size = static_cast<size_t>(s.hi - s.lo);
  f->ctx.fake = nullptr;
#if LK_EMU_UCONTEXT
  if (getcontext(&f->ctx.uc) != 0) return false;
  f->ctx.uc.uc_stack.ss_sp = s.lo;
  f->ctx.uc.uc_stack.ss_size = static_cast<size_t>(s.hi - s.lo);
  f->ctx.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->ctx.uc, reinterpret_cast<void (*)()>(uctx_entry), 2, static_cast<unsigned>(p & 0xffffffffu),
              static_cast<unsigned>(p >> 32));
#else
  /* Colour the stack tops (stacks are page-aligned and would all map to one cache set): up to 4 KiB. */
  const uintptr_t colour = static_cast<uintptr_t>((f->linear * 7u) & 63u) * 64u;
  const uintptr_t top = (reinterpret_cast<uintptr_t>(s.hi) - colour) & ~static_cast<uintptr_t>(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  sp[0] = 0x1F80ull | (0x037Full << 32); /* MXCSR default (no FTZ/DAZ, RNE), x87 CW default */
  sp[1] = 0;                             /* r15 */
  sp[2] = 0;                             /* r14 */
  sp[3] = reinterpret_cast<uint64_t>(&fiber_entry); /* r13: called by lk_emu_fiber_start */
  sp[4] = reinterpret_cast<uint64_t>(f);            /* r12: its argument */
  sp[5] = 0;                                        /* rbx */
  sp[6] = 0;                                        /* rbp: ends frame-pointer chains */
  sp[7] = reinterpret_cast<uint64_t>(&lk_emu_fiber_start);
  f->ctx.sp = sp;
#endif
  return true;
}

std::atomic<size_t> g_stacks{0}; /* fiber stacks mapped, process-wide */

bool stack_alloc(Stack& s) {
  const size_t total = kGuardSize + kStackSize;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  if (mprotect(p, kGuardSize, PROT_NONE) != 0) {
    munmap(p, total);
    return false;
  }
  s.map = static_cast<char*>(p);
  s.lo = s.map + kGuardSize;
  s.hi = s.lo + kStackSize;
  return true; /* the caller counts it in g_stacks */
}

void stack_free(Stack& s) {
#if LK_EMU_ASAN
  __asan_unpoison_memory_region(s.lo, kStackSize); /* the next mapping at this address starts clean */
#endif
  munmap(s.map, kGuardSize + kStackSize);
  s = Stack{};
  g_stacks.fetch_sub(1, std::memory_order_relaxed);
}

/* ---------------------------------------------------------------------------------------------- */
/* Aborts the block from inside a fiber: records the error and returns to the worker's own stack. */
[[noreturn]] __attribute__((format(printf, 3, 4))) void fail(Worker* w, int code, const char* fmt, ...) {
  Fiber* f = w->cur;
  int n = snprintf(w->msg, sizeof w->msg, "lk emu: block (%u,%u,%u) thread (%u,%u,%u) [warp %u lane %u]: ", w->bidx.x,
                   w->bidx.y, w->bidx.z, f->tid.x, f->tid.y, f->tid.z, f->warp, f->lane);
  if (n < 0) n = 0;
  if (static_cast<size_t>(n) < sizeof w->msg) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->msg + n, sizeof w->msg - static_cast<size_t>(n), fmt, ap);
    va_end(ap);
  }
  w->err = code;
  switch_to(w, &f->ctx, &w->main, true);
  __builtin_unreachable();
}

void describe_fiber(const Worker* w, const Fiber* f, char* buf, size_t n) {
  (void)w;
  const char* what = f->wkind < 0 ? "__syncthreads" : kKindName[f->wkind];
  snprintf(buf, n, "thread (%u,%u,%u) at %s (%s:%d)", f->tid.x, f->tid.y, f->tid.z, what, f->wfile, f->wline);
}

[[noreturn]] void deadlock(Worker* w) {
  /* No heap here: this fiber never resumes, so nothing on its stack is ever destroyed. */
  char list[1024];
  size_t used = 0;
  list[0] = 0;
  int shown = 0, waiting = 0;
  for (int i = 0; i < w->nthreads; ++i) {
    const Fiber& f = w->fibers[static_cast<size_t>(i)];
    if (f.state == F_DONE || f.state == F_RUN) continue;
    ++waiting;
    if (shown < 8 && used < sizeof list) {
      char buf[256];
      describe_fiber(w, &f, buf, sizeof buf);
      const int n = snprintf(list + used, sizeof list - used, "%s%s", shown ? "; " : "", buf);
      if (n > 0) used += static_cast<size_t>(n);
      ++shown;
    }
  }
  fail(w, LK_ERR_EMU_DEADLOCK, "deadlock: no thread can run; %d live, %d waiting: %s%s", w->nlive, waiting, list,
       waiting > shown ? "; ..." : "");
}

inline uint32_t warp_runnable(const Worker* w, uint32_t warp) {
  return static_cast<uint32_t>(w->runnable[warp >> 1] >> ((warp & 1u) * 32u));
}

/* __activemask waiters are released once no lane of their warp can run: each gets the lanes waiting
 * at the same call site. */
void resolve_activemask(Worker* w, uint32_t warp) {
  Warp& wp = w->warps[warp];
  if (!wp.am_waiting || warp_runnable(w, warp)) return;
  const uint32_t waiting = wp.am_waiting;
  wp.am_waiting = 0;
  uint32_t m = waiting;
  while (m) {
    const int l = __builtin_ctz(m);
    m &= m - 1;
    Fiber* f = &w->fibers[warp * 32 + static_cast<uint32_t>(l)];
    uint32_t same = 0, o = waiting;
    while (o) {
      const int k = __builtin_ctz(o);
      o &= o - 1;
      const Fiber* g = &w->fibers[warp * 32 + static_cast<uint32_t>(k)];
      if (same_site(f->wfile, f->wline, g->wfile, g->wline)) same |= 1u << k;
    }
    wp.slot[l].out = same;
    f->state = F_RUN;
    set_runnable(w, f);
  }
}

/* Switches to the next runnable fiber (possibly the current one, which may or may not be runnable). */
void reschedule(Worker* w) {
  Fiber* cur = w->cur;
  if (w->warps[cur->warp].am_waiting) resolve_activemask(w, cur->warp);
  Fiber* next = pick(w);
  if (!next) deadlock(w);
  if (next == cur) return;
  w->cur = next;
  threadIdx = next->tid;
  next->used = true;
  switch_to(w, &cur->ctx, &next->ctx, false);
}

void release_barrier(Worker* w) {
  for (Fiber* f : w->bar_waiters) {
    f->state = F_RUN;
    set_runnable(w, f);
    w->warps[f->warp].at_bar &= ~(1u << f->lane);
  }
  w->bar_waiters.clear();
  w->bar_arrived = 0;
  w->bar_first = nullptr;
}

/* A pending collective of f's warp that names f, or null. */
const Group* pending_naming(Worker* w, const Fiber* f) {
  const Warp& wp = w->warps[f->warp];
  for (int i = 0; i < wp.ngroups; ++i)
    if (wp.groups[i].mask & (1u << f->lane)) return &wp.groups[i];
  return nullptr;
}

/* The lanes a collective with this mask waits for: PTX shfl.sync / vote.sync / bar.warp.sync wait only for
 * the non-exited threads of membermask (the lanes a partial last warp lacks count as exited). */
inline uint32_t group_need(const Warp& wp, uint32_t mask) { return mask & wp.exists & ~wp.exited; }

inline bool is_aligned_kind(int kind) { return kind == K_MMA_F16 || kind == K_MMA_BF16 || kind == K_LDMATRIX; }

void compute_group(Worker* w, Warp& wp, const Group& g);

/* Removes pending group i (complete) from its warp, computes it and makes its waiting lanes runnable. */
void complete_group(Worker* w, uint32_t warp, int i) {
  Warp& wp = w->warps[warp];
  const Group done = wp.groups[i];
  wp.groups[i] = wp.groups[--wp.ngroups];
  compute_group(w, wp, done);
  const Fiber* cur = w->cur;
  uint32_t m = done.arrived;
  while (m) {
    const int l = __builtin_ctz(m);
    m &= m - 1;
    Fiber* o = &w->fibers[warp * 32 + static_cast<uint32_t>(l)];
    if (o == cur) continue; /* the caller: runnable already */
    o->state = F_RUN;
    set_runnable(w, o);
  }
}

[[noreturn]] void thread_exit(Worker* w) {
  Fiber* f = w->cur;
  if (!f->copies.empty() && w->L->strict) {
    const Copy& c = f->copies.front();
    fail(w, LK_ERR_EMU_ASYNC_COPY,
         "thread exited with %zu cp.async copies never waited for (the first issued at %s:%d; %s; strict mode: "
         "LK_EMU_STRICT=0 allows it)",
         f->copies.size(), c.file, c.line,
         c.group < f->commits ? "committed but no cp_async_wait covered it" : "never committed");
  }
  f->copies.clear();
  Warp& wp = w->warps[f->warp];
  const uint32_t bit = 1u << f->lane;
  for (int i = 0; i < wp.ngroups; ++i) {
    const Group& g = wp.groups[i];
    if ((g.mask & bit) && is_aligned_kind(g.kind))
      fail(w, LK_ERR_EMU_WARP,
           "thread exited while lanes 0x%08x of its warp wait for it at %s (%s:%d; .aligned: all 32 lanes must "
           "execute it)",
           g.arrived, kKindName[g.kind], g.file, g.line);
  }
  f->state = F_DONE;
  clear_runnable(w, f);
  wp.exited |= bit;
  --w->nlive;
  /* Collectives waiting for this lane now wait only for the others: complete those that are full. */
  for (int i = 0; i < wp.ngroups;) {
    const Group& g = wp.groups[i];
    if ((g.mask & bit) && g.arrived == group_need(wp, g.mask))
      complete_group(w, f->warp, i); /* moves the last group to i: look at i again */
    else
      ++i;
  }
  if (w->bar_arrived > 0 && w->bar_arrived == w->nlive) release_barrier(w);
  if (wp.am_waiting) resolve_activemask(w, f->warp);
  Fiber* next = pick(w);
  if (!next) {
    if (w->nlive == 0) {
      switch_to(w, &f->ctx, &w->main, true);
      __builtin_unreachable();
    }
    deadlock(w);
  }
  w->cur = next;
  threadIdx = next->tid;
  next->used = true;
  switch_to(w, &f->ctx, &next->ctx, true);
  __builtin_unreachable();
}

void fiber_entry(Fiber* f) {
  Worker* w = tl_w;
#if LK_EMU_ASAN
  asan_finish(w, nullptr);
#endif
  (void)f;
  w->L->thunk(w->L->args);
  thread_exit(w);
}

/* ---------------------------------------------------------------------------------------------- */
/* Warp collectives. The caller has filled its slot; returns once the collective completed. */
void collective(Worker* w, int kind, uint32_t mask, int extra, const char* file, int line) {
  Fiber* f = w->cur;
  Warp& wp = w->warps[f->warp];
  const uint32_t bit = 1u << f->lane;
  const char* name = kKindName[kind];
  if (!(mask & bit))
    fail(w, LK_ERR_EMU_WARP, "%s (%s:%d) with mask 0x%08x that does not include the calling lane", name, file, line,
         mask);
  if (is_aligned_kind(kind) && (wp.exists != 0xffffffffu || wp.exited))
    fail(w, LK_ERR_EMU_WARP,
         "%s (%s:%d) in a warp whose lanes 0x%08x have exited or do not exist (.aligned: all 32 lanes must execute "
         "it)",
         name, file, line, ~wp.exists | wp.exited);
  if (mask & wp.at_bar)
    fail(w, LK_ERR_EMU_WARP,
         "%s (%s:%d) with mask 0x%08x names lanes waiting at __syncthreads (0x%08x): divergent warp", name, file, line,
         mask, mask & wp.at_bar);
  /* Lanes at collectives with the same mask must be at the same one (kind, call site, operands). Groups
   * with different, overlapping masks may coexist (a lane can be behind, e.g. sequential divergent
   * branches); only a definite cycle is reported here, anything longer is found as a deadlock. */
  Group* g = nullptr;
  int gi = -1;
  for (int i = 0; i < wp.ngroups; ++i)
    if (wp.groups[i].mask == mask) {
      g = &wp.groups[i];
      gi = i;
      break;
    }
  if (g) {
    if (g->kind != kind || g->extra != extra || !same_site(g->file, g->line, file, line)) {
      if (kind == K_SYNCWARP && g->kind == K_SYNCWARP && !w->L->strict) {
        /* non-strict: __syncwarp at different call sites is one barrier (sm_70+) */
      } else {
        fail(w, LK_ERR_EMU_WARP,
             "divergent warp: this lane reached %s (%s:%d, mask 0x%08x) while lanes 0x%08x wait at %s (%s:%d, same "
             "mask)",
             name, file, line, mask, g->arrived, kKindName[g->kind], g->file, g->line);
      }
    }
    g->arrived |= bit;
  } else {
    gi = wp.ngroups++;
    g = &wp.groups[gi];
    *g = Group{mask, bit, kind, extra, file, line};
  }
  if (g->arrived == group_need(wp, mask)) {
    complete_group(w, f->warp, gi);
    reschedule(w);
    return;
  }
  for (int i = 0; i < wp.ngroups; ++i) {
    const Group& o = wp.groups[i];
    if (&o != g && (g->arrived & o.mask) && (o.arrived & g->mask))
      fail(w, LK_ERR_EMU_WARP,
           "divergent warp: lanes 0x%08x wait at %s (%s:%d, mask 0x%08x) for lanes 0x%08x that wait at %s (%s:%d, "
           "mask 0x%08x) for them",
           g->arrived, kKindName[g->kind], g->file, g->line, g->mask, o.arrived & g->mask, kKindName[o.kind], o.file,
           o.line, o.mask);
  }
  f->state = F_WARP;
  f->wkind = kind;
  f->wfile = file;
  f->wline = line;
  clear_runnable(w, f);
  reschedule(w);
}

inline int shfl_src(int kind, int lane, int b, int width) {
  /* PTX shfl.sync with c = ((32 - width) << 8) | clamp, clamp = 0 for up and 0x1f otherwise. */
  const uint32_t c = (static_cast<uint32_t>(32 - width) << 8) | (kind == K_SHFL_UP ? 0u : 0x1fu);
  const int segmask = static_cast<int>((c >> 8) & 0x1fu);
  const int cval = static_cast<int>(c & 0x1fu);
  const int bval = b & 0x1f;
  const int maxLane = (lane & segmask) | (cval & ~segmask);
  const int minLane = lane & segmask;
  int j;
  bool pval;
  switch (kind) {
    case K_SHFL_UP:
      j = lane - bval;
      pval = j >= maxLane;
      break;
    case K_SHFL_DOWN:
      j = lane + bval;
      pval = j <= maxLane;
      break;
    case K_SHFL_XOR:
      j = lane ^ bval;
      pval = j <= maxLane;
      break;
    default: /* idx */
      j = minLane | (bval & ~segmask);
      pval = j <= maxLane;
      break;
  }
  return pval ? j : lane;
}

inline float half_bits_f32(int kind, uint16_t h) {
  return kind == K_MMA_F16 ? f16_bits_to_f32(h) : bf16_bits_to_f32(h);
}

void compute_group(Worker* w, Warp& wp, const Group& g) {
  switch (g.kind) {
    case K_SHFL_IDX:
    case K_SHFL_UP:
    case K_SHFL_DOWN:
    case K_SHFL_XOR: {
      uint32_t m = g.arrived; /* the participating lanes: in the mask, existing, not exited */
      while (m) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        Slot& s = wp.slot[l];
        const int src = shfl_src(g.kind, l, s.arg, s.width);
        /* a source lane outside the mask or exited is undefined on hardware: poison */
        wp.slot[l].out = ((g.arrived >> src) & 1u) ? wp.slot[src].in : ~0ull;
      }
      break;
    }
    case K_BALLOT:
    case K_ANY:
    case K_ALL: {
      /* exited lanes contribute 0; __all_sync considers the participating lanes only */
      uint32_t ballot = 0, m = g.arrived;
      while (m) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        if (wp.slot[l].in) ballot |= 1u << l;
      }
      const uint64_t r = g.kind == K_BALLOT ? ballot : g.kind == K_ANY ? (ballot != 0) : (ballot == g.arrived);
      m = g.arrived;
      while (m) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        wp.slot[l].out = r;
      }
      break;
    }
    case K_SYNCWARP:
      break;
    case K_MMA_F16:
    case K_MMA_BF16: {
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const uint32_t* a = static_cast<const uint32_t*>(wp.slot[l].p[0]);
        const uint32_t* b = static_cast<const uint32_t*>(wp.slot[l].p[1]);
        const float* c = static_cast<const float*>(wp.slot[l].p[2]);
        const int gq = l >> 2, t = l & 3;
        for (int r = 0; r < 4; ++r)
          for (int h = 0; h < 2; ++h)
            A[gq + 8 * (r & 1)][2 * t + 8 * (r >> 1) + h] =
                half_bits_f32(g.kind, static_cast<uint16_t>(a[r] >> (16 * h)));
        for (int r = 0; r < 2; ++r)
          for (int h = 0; h < 2; ++h)
            B[2 * t + 8 * r + h][gq] = half_bits_f32(g.kind, static_cast<uint16_t>(b[r] >> (16 * h)));
        for (int i = 0; i < 4; ++i) C[gq + 8 * (i >> 1)][2 * t + (i & 1)] = c[i];
      }
      float D[16][8];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
          double acc = 0.0;
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * static_cast<double>(B[k][j]);
          D[i][j] = static_cast<float>(acc + static_cast<double>(C[i][j]));
        }
      for (int l = 0; l < 32; ++l) {
        float* d = static_cast<float*>(wp.slot[l].pout);
        const int gq = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) d[i] = D[gq + 8 * (i >> 1)][2 * t + (i & 1)];
      }
      break;
    }
    case K_LDMATRIX: {
      const int num = g.extra & 7;
      const bool trans = (g.extra & 8) != 0;
      for (int l = 0; l < 8 * num; ++l) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(wp.slot[l].p[0]);
        if (a & 15u)
          fail(w, LK_ERR_EMU_WARP, "ldmatrix (%s:%d): lane %d's row address %p is not 16-byte aligned", g.file, g.line,
               l, wp.slot[l].p[0]);
      }
      uint32_t res[32][4];
      for (int m = 0; m < num; ++m)
        for (int i = 0; i < 32; ++i) {
          uint16_t e[2];
          for (int h = 0; h < 2; ++h) {
            const int row = trans ? 2 * (i % 4) + h : i / 4;
            const int col = trans ? i / 4 : 2 * (i % 4) + h;
            memcpy(&e[h], static_cast<const char*>(wp.slot[m * 8 + row].p[0]) + 2 * col, 2);
          }
          res[i][m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
        }
      for (int i = 0; i < 32; ++i) memcpy(wp.slot[i].pout, res[i], sizeof(uint32_t) * static_cast<size_t>(num));
      break;
    }
    default:
      break;
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Block execution on the worker's own stack. */
int run_block(Worker* w, uint64_t b) {
  Launch* L = w->L;
  const uint64_t gx = L->grid.x, gy = L->grid.y;
  w->bidx = uint3{static_cast<unsigned>(b % gx), static_cast<unsigned>((b / gx) % gy),
                  static_cast<unsigned>(b / (gx * gy))};
  blockIdx = w->bidx;
  const int n = static_cast<int>(L->nthreads);
  w->nthreads = n;
  w->nlive = n;
  w->nwarps = (n + 31) / 32;
  w->bar_arrived = 0;
  w->bar_first = nullptr;
  w->bar_waiters.clear();
  w->err = 0;
  w->msg[0] = 0;
  memset(w->runnable, 0, sizeof w->runnable);
  w->nrunnable = 0;
  for (int i = 0; i < w->nwarps; ++i) {
    Warp& wp = w->warps[i];
    const int lanes = n - 32 * i >= 32 ? 32 : n - 32 * i;
    wp.exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    wp.exited = 0;
    wp.at_bar = 0;
    wp.am_waiting = 0;
    wp.ngroups = 0;
  }
  const unsigned bx = L->block.x, by = L->block.y;
  for (int i = 0; i < n; ++i) {
    Fiber& f = w->fibers[static_cast<size_t>(i)]; /* its stack was mapped by worker_loop */
    const unsigned u = static_cast<unsigned>(i);
    f.tid = uint3{u % bx, (u / bx) % by, u / (bx * by)};
    f.linear = u;
    if (!ctx_init(&f)) {
      w->err = LK_ERR_EMU_INTERNAL;
      snprintf(w->msg, sizeof w->msg, "lk emu: getcontext failed");
      return w->err;
    }
    f.lane = u & 31u;
    f.warp = u >> 5;
    f.state = F_RUN;
    f.wkind = -1;
    f.copies.clear();
    f.commits = 0;
    set_runnable(w, &f);
  }
  if (L->smem) memset(tl_dynamic_smem, 0xFF, L->smem);
  uint64_t s = L->seed;
  splitmix64(s);
  s ^= b * 0xD1B54A32D192ED03ull;
  w->rng = splitmix64(s);
  Fiber* first = pick(w);
  w->cur = first;
  threadIdx = first->tid;
  first->used = true;
  switch_to(w, &w->main, &first->ctx, false);
  w->cur = nullptr;
  return w->err;
}

/* ---------------------------------------------------------------------------------------------- */
/* Signals: a guard-page hit inside a fiber is reported and ends the process; anything else is passed on. */
struct sigaction g_old_segv;
std::once_flag g_sig_once;

/* True if a fault at address a, with the interrupted stack pointer sp (null if unknown), is f overflowing its
 * stack: a hit in its guard, or (a frame that skipped the guard, code built without
 * -fstack-clash-protection) a hit just below it with sp below the stack. */
bool is_overflow(const Fiber* f, const char* a, const char* sp) {
  if (!f->stack.map) return false;
  if (a >= f->stack.map && a < f->stack.lo) return true;
  return sp && sp < f->stack.lo && sp >= f->stack.map - 65536 && a >= f->stack.map - 65536 && a < f->stack.map;
}

void segv_handler(int sig, siginfo_t* si, void* uc) {
  Worker* w = tl_w;
  if (w && w->cur) {
    Fiber* f = w->cur;
    const char* a = static_cast<const char*>(si->si_addr);
    const char* sp = nullptr;
#if defined(__x86_64__) && defined(REG_RSP)
    if (uc) sp = reinterpret_cast<const char*>(static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_RSP]);
#endif
    if (is_overflow(f, a, sp)) {
      /* A fault raised by the fiber's own code (a function prologue or a stack probe): abandon the block as
       * fail() does. We leave the handler by switching to the worker's scheduler context (the signal frame
       * on the alternate stack is abandoned; the kernel sees we are no longer on it), so first restore the
       * signal mask from before the fault: SIGSEGV must not stay blocked. Not "safe" if the overflow hit
       * inside a libc call holding a lock (printf from a kernel); then the next use of that lock hangs. */
      snprintf(w->msg, sizeof w->msg,
               "lk emu: stack overflow in block (%u,%u,%u) thread (%u,%u,%u) [warp %u lane %u]: fiber stacks are %zu "
               "KiB (large per-thread arrays belong in shared or global memory)",
               w->bidx.x, w->bidx.y, w->bidx.z, f->tid.x, f->tid.y, f->tid.z, f->warp, f->lane, kStackSize / 1024);
      w->err = LK_ERR_EMU_STACK_OVERFLOW;
      if (uc) pthread_sigmask(SIG_SETMASK, &static_cast<ucontext_t*>(uc)->uc_sigmask, nullptr);
      Ctx abandoned;
#if !LK_EMU_UCONTEXT
      f->ctx.sp = nullptr; /* ASan: unpoison the whole stack when it is reused */
#endif
      switch_to(w, &abandoned, &w->main, true);
      __builtin_unreachable();
    }
  }
  if (g_old_segv.sa_flags & SA_SIGINFO) {
    if (g_old_segv.sa_sigaction) {
      g_old_segv.sa_sigaction(sig, si, uc);
      return;
    }
  } else if (g_old_segv.sa_handler == SIG_IGN) {
    return;
  } else if (g_old_segv.sa_handler != SIG_DFL && g_old_segv.sa_handler) {
    g_old_segv.sa_handler(sig);
    return;
  }
  /* default action: restore it and return, so the faulting instruction faults again */
  signal(sig, SIG_DFL);
}

#if LK_EMU_ASAN
/* An AddressSanitizer report inside a kernel ends the process: name the block and thread first. */
void asan_death_callback() {
  Worker* w = tl_w;
  if (!w || !w->cur) return;
  const Fiber* f = w->cur;
  fprintf(stderr, "lk emu: the AddressSanitizer report above is from block (%u,%u,%u) thread (%u,%u,%u)\n", w->bidx.x,
          w->bidx.y, w->bidx.z, f->tid.x, f->tid.y, f->tid.z);
}
#endif

void install_segv_handler() {
  std::call_once(g_sig_once, [] {
#if LK_EMU_ASAN
    __sanitizer_set_death_callback(asan_death_callback);
#endif
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
  });
}

/* An alternate signal stack for the current thread if it has none (stack overflows need one). */
struct AltStack {
  void* mem = nullptr;
  ~AltStack() {
    if (!mem) return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_flags = SS_DISABLE;
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && cur.ss_sp == mem) sigaltstack(&ss, nullptr);
    munmap(mem, kAltSize);
  }
  static constexpr size_t kAltSize = 64 * 1024;
  void ensure() {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) != 0) return;
    if (!(cur.ss_flags & SS_DISABLE)) return;
    if (!mem) {
      void* p = mmap(nullptr, kAltSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return;
      mem = p;
    }
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = mem;
    ss.ss_size = kAltSize;
    sigaltstack(&ss, nullptr);
  }
};
thread_local AltStack tl_altstack;

/* ---------------------------------------------------------------------------------------------- */
/* Never destroyed (workers may be in use by other threads at exit; LeakSanitizer sees them reachable). */
std::mutex g_pool_mu;
std::vector<Worker*>* const g_pool = new std::vector<Worker*>();
std::mutex g_smem_mu;
std::unordered_map<const void*, size_t>* const g_smem_limit = new std::unordered_map<const void*, size_t>();

Worker* acquire_worker() {
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    if (!g_pool->empty()) {
      Worker* w = g_pool->back();
      g_pool->pop_back();
      return w;
    }
  }
  return new (std::nothrow) Worker();
}
void release_worker(Worker* w) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_pool->push_back(w);
}

/* Maps stacks for the first n fibers of w; false if mmap fails (vm.max_map_count, address space) or, for a
 * helper (!owner), if that would take the process past kHelperStackBudget: the launching thread always
 * gets its stacks, helpers join only while mappings are plentiful. */
bool ensure_stacks(Worker* w, int n, bool owner) {
  if (static_cast<int>(w->fibers.size()) < n) w->fibers.resize(static_cast<size_t>(n));
  size_t missing = 0;
  for (int i = 0; i < n; ++i) missing += w->fibers[static_cast<size_t>(i)].stack.map ? 0 : 1;
  if (!missing) return true;
  const size_t before = g_stacks.fetch_add(missing, std::memory_order_relaxed); /* reserve */
  if (!owner && before + missing > kHelperStackBudget) {
    g_stacks.fetch_sub(missing, std::memory_order_relaxed);
    return false;
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = w->fibers[static_cast<size_t>(i)];
    if (f.stack.map) continue;
    if (!stack_alloc(f.stack)) {
      g_stacks.fetch_sub(missing, std::memory_order_relaxed); /* the reservations not used */
      return false;
    }
    --missing;
  }
  return true;
}

/* After a launch: while more than kStackCacheCap stacks are mapped process-wide, unmap this worker's
 * (from the highest thread index down), so that idle workers do not pin vm.max_map_count. */
void trim_stacks(Worker* w) {
  for (size_t i = w->fibers.size(); i-- > 0;) {
    if (g_stacks.load(std::memory_order_relaxed) <= kStackCacheCap) return;
    Fiber& f = w->fibers[i];
    if (!f.stack.map) continue;
    stack_free(f.stack);
    f.used = false;
  }
}

/* Runs blocks of L until none is left or an error stopped the launch. owner: the launching thread (its
 * failure to set up is the launch's error; a helper that cannot set up just leaves the blocks to others). */
void worker_loop(Worker* w, Launch* L, bool owner) {
  auto setup_failed = [&](const char* what) {
    if (!owner) return;
    std::lock_guard<std::mutex> lk(L->mu);
    if (!L->err) {
      L->err = LK_ERR_EMU_INTERNAL;
      char buf[256];
      snprintf(buf, sizeof buf, "lk emu: %s: %s", what, strerror(errno));
      L->msg = buf;
    }
    L->stop.store(true);
  };
  if (L->stop.load(std::memory_order_relaxed) || L->next.load(std::memory_order_relaxed) >= L->total) return;
  tl_altstack.ensure();
  if (!ensure_stacks(w, static_cast<int>(L->nthreads), owner)) {
    setup_failed("mmap of a 64 KiB fiber stack failed");
    trim_stacks(w);
    return;
  }
  unsigned char* smem = nullptr;
  if (L->smem) {
    smem = static_cast<unsigned char*>(::operator new(L->smem, std::align_val_t(128), std::nothrow));
    if (!smem) {
      errno = ENOMEM;
      setup_failed("cannot allocate dynamic shared memory");
      return;
    }
  }
  w->L = L;
  w->main_known = false;
  tl_w = w;
  blockDim = L->block;
  gridDim = L->grid;
  tl_dynamic_smem = smem;
  while (!L->stop.load(std::memory_order_relaxed)) {
    const uint64_t b = L->next.fetch_add(1, std::memory_order_relaxed);
    if (b >= L->total) break;
    const int e = run_block(w, b);
    if (e) {
      std::lock_guard<std::mutex> lk(L->mu);
      if (!L->err) {
        L->err = e;
        L->msg = w->msg;
      }
      L->stop.store(true);
      break;
    }
  }
  tl_dynamic_smem = nullptr;
  if (smem) ::operator delete(smem, std::align_val_t(128));
  tl_w = nullptr;
  w->L = nullptr;
  trim_stacks(w);
}

/* ---------------------------------------------------------------------------------------------- */
/* Helper threads: a process-wide pool, created lazily and never destroyed, shared by every host thread.
 * A launch that wants k > 0 helpers enters the queue with k open slots; an idle helper takes a slot of
 * the oldest queued launch and runs its blocks with its own Worker. The launching thread always runs
 * blocks of its own launch too, so every launch progresses even when all helpers are busy elsewhere;
 * when it runs out of blocks it closes the slots and waits for the helpers still running blocks. */
struct HelperPool {
  std::mutex mu;
  std::condition_variable wake;
  std::vector<Launch*> queue;
  uint64_t nhelpers = 0;
};
HelperPool* const g_helpers = new HelperPool(); /* never destroyed: helpers wait on it at exit */

void helper_main(Worker* w) {
  sigset_t sync_faults; /* a synchronous fault in a blocked signal would kill the process silently */
  sigemptyset(&sync_faults);
  sigaddset(&sync_faults, SIGSEGV);
  sigaddset(&sync_faults, SIGBUS);
  pthread_sigmask(SIG_UNBLOCK, &sync_faults, nullptr);
  HelperPool& P = *g_helpers;
  std::unique_lock<std::mutex> lk(P.mu);
  for (;;) {
    P.wake.wait(lk, [&] { return !P.queue.empty(); });
    Launch* L = P.queue.front();
    if (--L->want == 0) P.queue.erase(P.queue.begin());
    ++L->helpers;
    lk.unlock();
    worker_loop(w, L, false);
    lk.lock();
    if (--L->helpers == 0) L->helpers_done.notify_all(); /* under the mutex: L outlives this call */
  }
}

/* Grows the pool to at least n helpers (fewer if threads cannot be created). */
void ensure_helpers(uint64_t n) {
  HelperPool& P = *g_helpers;
  std::lock_guard<std::mutex> lk(P.mu);
  while (P.nhelpers < n) {
    Worker* w = new (std::nothrow) Worker();
    if (!w) return;
    try {
      std::thread(helper_main, w).detach();
    } catch (...) {
      delete w;
      return;
    }
    ++P.nhelpers;
  }
}

/* lk_emu_set_schedule(): a per-host-thread override of LK_EMU_ORDER / LK_EMU_SEED, so a test can
 * pin a schedule without touching the process environment. */
struct ScheduleOverride {
  bool active = false;
  int order = 0;
  uint64_t seed = 0;
};
thread_local ScheduleOverride tl_schedule;

bool env_u64(const char* name, uint64_t* out, bool* present) {
  const char* v = getenv(name);
  *present = v && *v;
  if (!*present) return true;
  char* end = nullptr;
  errno = 0;
  const unsigned long long x = strtoull(v, &end, 0);
  if (errno || !end || *end || v[0] == '-') return false;
  *out = x;
  return true;
}

}  // namespace

/* ---------------------------------------------------------------------------------------------- */
/* Entry points called from emu.cuh. */
int launch_impl(const LaunchDesc& d) {
  if (tl_w)
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG, "lk emu: launch from inside a kernel (dynamic parallelism) is not "
                                               "supported");
  const dim3 g = d.grid, b = d.block;
  const uint64_t nthreads = static_cast<uint64_t>(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG,
                     "lk emu: invalid launch configuration: empty grid (%u,%u,%u) or block (%u,%u,%u) (as on the GPU)",
                     g.x, g.y, g.z, b.x, b.y, b.z);
  if (g.x > 0x7fffffffu || g.y > 65535u || g.z > 65535u)
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG,
                     "lk emu: grid (%u,%u,%u) exceeds the limits (x <= 2^31-1, y and z <= 65535)", g.x, g.y, g.z);
  if (b.x > 1024u || b.y > 1024u || b.z > 64u || nthreads > 1024u)
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG,
                     "lk emu: block (%u,%u,%u) exceeds the limits (x, y <= 1024, z <= 64, at most 1024 threads)", b.x,
                     b.y, b.z);
  if (d.smem > kMaxSmem)
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG, "lk emu: %zu bytes of dynamic shared memory exceed the 227 KiB limit",
                     d.smem);
  if (d.smem > kDefaultSmemLimit) {
    size_t limit = kDefaultSmemLimit;
    {
      std::lock_guard<std::mutex> lk(g_smem_mu);
      auto it = g_smem_limit->find(d.kernel_id);
      if (it != g_smem_limit->end()) limit = it->second;
    }
    if (d.smem > limit)
      return set_error(LK_ERR_EMU_LAUNCH_CONFIG,
                       "lk emu: %zu bytes of dynamic shared memory exceed this kernel's limit of %zu bytes (raise it "
                       "with set_max_dynamic_smem, as cudaFuncSetAttribute must on the GPU)",
                       d.smem, limit);
  }

  Launch L;
  L.thunk = d.thunk;
  L.args = d.args;
  L.grid = g;
  L.block = b;
  L.smem = d.smem;
  L.nthreads = static_cast<uint32_t>(nthreads);
  L.total = static_cast<uint64_t>(g.x) * g.y * g.z;
  L.order = ORDER_FWD;
  L.seed = 0;
  L.strict = true;

  bool present = false;
  uint64_t v = 0;
  if (tl_schedule.active) { /* the override replaces LK_EMU_ORDER / LK_EMU_SEED: they are not even parsed */
    L.order = tl_schedule.order;
    L.seed = tl_schedule.seed;
  } else {
    if (const char* o = getenv("LK_EMU_ORDER")) {
      if (!*o || !strcmp(o, "fwd")) L.order = ORDER_FWD;
      else if (!strcmp(o, "rev")) L.order = ORDER_REV;
      else if (!strcmp(o, "rand")) L.order = ORDER_RAND;
      else
        return set_error(LK_ERR_EMU_LAUNCH_CONFIG, "lk emu: LK_EMU_ORDER=%s is not one of fwd, rev, rand", o);
    }
    if (!env_u64("LK_EMU_SEED", &v, &present))
      return set_error(LK_ERR_EMU_LAUNCH_CONFIG, "lk emu: LK_EMU_SEED=%s is not an unsigned integer",
                       getenv("LK_EMU_SEED"));
    if (present) L.seed = v;
  }
  if (!env_u64("LK_EMU_STRICT", &v, &present) || (present && v > 1))
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG, "lk emu: LK_EMU_STRICT=%s is not 0 or 1", getenv("LK_EMU_STRICT"));
  if (present) L.strict = v != 0;
  uint64_t nworkers = std::thread::hardware_concurrency();
  if (nworkers == 0) nworkers = 1;
  if (nworkers > 4) nworkers = 4;
  if (!env_u64("LK_EMU_WORKERS", &v, &present) || (present && v < 1))
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG, "lk emu: LK_EMU_WORKERS=%s is not a positive integer",
                     getenv("LK_EMU_WORKERS"));
  if (present) nworkers = v < kMaxWorkers ? v : kMaxWorkers;
  if (nworkers > L.total) nworkers = L.total;

  install_segv_handler();

  Worker* w0 = acquire_worker();
  if (!w0) return set_error(LK_ERR_EMU_INTERNAL, "lk emu: out of memory for a worker");
  const uint64_t nhelp = nworkers - 1;
  HelperPool& P = *g_helpers;
  if (nhelp) {
    ensure_helpers(nhelp);
    {
      std::lock_guard<std::mutex> lk(P.mu);
      L.want = static_cast<int>(nhelp);
      P.queue.push_back(&L);
    }
    for (uint64_t i = 0; i < nhelp; ++i) P.wake.notify_one();
  }
  worker_loop(w0, &L, true);
  if (nhelp) {
    std::unique_lock<std::mutex> lk(P.mu);
    if (L.want > 0) P.queue.erase(std::find(P.queue.begin(), P.queue.end(), &L));
    L.want = 0;
    L.helpers_done.wait(lk, [&] { return L.helpers == 0; });
  }
  release_worker(w0);
  if (L.err) return set_error(L.err, "%s", L.msg.c_str());
  return 0;
}

int set_max_dynamic_smem_impl(const void* kernel_id, size_t bytes) {
  if (bytes > kMaxSmem)
    return set_error(LK_ERR_EMU_LAUNCH_CONFIG,
                     "lk emu: set_max_dynamic_smem(%zu): more than the 227 KiB of shared memory a block can have",
                     bytes);
  std::lock_guard<std::mutex> lk(g_smem_mu);
  (*g_smem_limit)[kernel_id] = bytes;
  return 0;
}

void syncthreads(const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return; /* called outside a kernel: nothing to wait for */
  Fiber* f = w->cur;
  if (const Group* g = pending_naming(w, f))
    fail(w, LK_ERR_EMU_WARP,
         "divergent warp: this lane reached __syncthreads (%s:%d) while lanes 0x%08x wait for it at %s (%s:%d, mask "
         "0x%08x)",
         file, line, g->arrived, kKindName[g->kind], g->file, g->line, g->mask);
  if (w->bar_arrived == 0) {
    w->bar_file = file;
    w->bar_line = line;
    w->bar_first = f;
  } else if (w->L->strict && !same_site(file, line, w->bar_file, w->bar_line)) {
    const Fiber* o = w->bar_first;
    fail(w, LK_ERR_EMU_BARRIER,
         "__syncthreads at %s:%d while thread (%u,%u,%u) and %d other(s) wait at __syncthreads at %s:%d (strict mode: "
         "one call site per barrier; LK_EMU_STRICT=0 allows it)",
         file, line, o->tid.x, o->tid.y, o->tid.z, w->bar_arrived - 1, w->bar_file, w->bar_line);
  }
  f->state = F_BAR;
  f->wkind = -1;
  f->wfile = file;
  f->wline = line;
  clear_runnable(w, f);
  w->warps[f->warp].at_bar |= 1u << f->lane;
  w->bar_waiters.push_back(f);
  if (++w->bar_arrived == w->nlive) release_barrier(w);
  reschedule(w);
}

uint64_t shfl(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return bits;
  if (width != 1 && width != 2 && width != 4 && width != 8 && width != 16 && width != 32)
    fail(w, LK_ERR_EMU_WARP, "%s (%s:%d): width %d is not a power of two in 1..32", kKindName[kind], file, line,
         width);
  Fiber* f = w->cur;
  Slot& s = w->warps[f->warp].slot[f->lane];
  s.in = bits;
  s.arg = arg;
  s.width = width;
  collective(w, kind, mask, 0, file, line);
  return w->warps[f->warp].slot[f->lane].out;
}

unsigned vote(int kind, unsigned mask, int pred, const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return kind == K_BALLOT ? (pred ? 1u : 0u) : (pred != 0);
  Fiber* f = w->cur;
  w->warps[f->warp].slot[f->lane].in = pred != 0;
  collective(w, kind, mask, 0, file, line);
  return static_cast<unsigned>(w->warps[f->warp].slot[f->lane].out);
}

void syncwarp(unsigned mask, const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return;
  collective(w, K_SYNCWARP, mask, 0, file, line);
}

unsigned activemask(const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return 1u;
  Fiber* f = w->cur;
  f->state = F_WARP;
  f->wkind = K_ACTIVEMASK;
  f->wfile = file;
  f->wline = line;
  clear_runnable(w, f);
  w->warps[f->warp].am_waiting |= 1u << f->lane;
  reschedule(w);
  return static_cast<unsigned>(w->warps[f->warp].slot[f->lane].out);
}

void mma(int kind, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
         int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return;
  Fiber* f = w->cur;
  Slot& s = w->warps[f->warp].slot[f->lane];
  s.p[0] = a;
  s.p[1] = b;
  s.p[2] = c;
  s.pout = d;
  collective(w, kind, 0xffffffffu, 0, file, line); /* .aligned: the whole warp, converged */
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* row, const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) return;
  Fiber* f = w->cur;
  Slot& s = w->warps[f->warp].slot[f->lane];
  s.p[0] = row;
  s.pout = r;
  collective(w, K_LDMATRIX, 0xffffffffu, num | (trans ? 8 : 0), file, line);
}

void cp_async(int size, void* dst, const void* src, const char* file, int line) {
  Worker* w = tl_w;
  if (!w || !w->cur) {
    memcpy(dst, src, static_cast<size_t>(size));
    return;
  }
  const uintptr_t us = static_cast<uintptr_t>(size) - 1u;
  if ((reinterpret_cast<uintptr_t>(dst) & us) || (reinterpret_cast<uintptr_t>(src) & us))
    fail(w, LK_ERR_EMU_ASYNC_COPY, "cp_async_%d (%s:%d): addresses must be %d-byte aligned (dst %p, src %p)", size, file,
         line, size, dst, src);
  Fiber* f = w->cur;
  f->copies.push_back(Copy{dst, src, static_cast<uint32_t>(size), f->commits, file, line});
  memset(dst, 0xFF, static_cast<size_t>(size)); /* undefined until the wait: poison */
}

void cp_async_commit() {
  Worker* w = tl_w;
  if (!w || !w->cur) return;
  ++w->cur->commits;
}

void cp_async_wait(int n) {
  Worker* w = tl_w;
  if (!w || !w->cur) return;
  Fiber* f = w->cur;
  const uint32_t un = static_cast<uint32_t>(n);
  const uint32_t limit = f->commits > un ? f->commits - un : 0; /* complete groups with id < limit */
  size_t k = 0;
  while (k < f->copies.size() && f->copies[k].group < limit) {
    const Copy& c = f->copies[k];
    memcpy(c.dst, c.src, c.size);
    ++k;
  }
  if (k) f->copies.erase(f->copies.begin(), f->copies.begin() + static_cast<std::ptrdiff_t>(k));
}

}  // namespace detail
}  // namespace emu
}  // namespace lk

extern "C" const char* lk_emu_last_error_message(void) { return lk::emu::error_message(); }

extern "C" int lk_emu_set_schedule(const char* order, uint64_t seed) {
  using namespace lk::emu::detail;
  using lk::emu::set_error;
  if (order == nullptr) {
    tl_schedule = ScheduleOverride{};
    return 0;
  }
  int o;
  if (!strcmp(order, "fwd")) o = ORDER_FWD;
  else if (!strcmp(order, "rev")) o = ORDER_REV;
  else if (!strcmp(order, "rand")) o = ORDER_RAND;
  else return set_error(LK_ERR_INVALID_ARGUMENT, "lk_emu_set_schedule: order `%s` is not one of fwd, rev, rand", order);
  tl_schedule.active = true;
  tl_schedule.order = o;
  tl_schedule.seed = seed;
  return 0;
}
