// The emulator's runtime: fibers, the block scheduler, barriers, warp collectives, cp.async queues
// and the C entry point `emu_launch`. Included once, at the end of emu.h (one translation unit per
// .so), so its definitions are not inline.
#pragma once

extern "C" unsigned char __start_ilrec_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_ilrec_emu_shared[] __attribute__((weak, visibility("hidden")));

uint3 blockIdx;
dim3 blockDim, gridDim;

namespace ilrec_emu {

// Context switches. glibc's swapcontext makes a signal-mask system call on every switch, which
// was 85% of a launch's time (each thread switches at least twice per block); on x86-64 a
// switch is instead the callee-saved registers, the FP control words and the stack pointer.
#if defined(__x86_64__) && !defined(ILREC_EMU_UCONTEXT)
struct FiberCtx {
    void *sp = nullptr;
};
extern "C" void ilrec_emu_ctx_switch(void **save_sp, void *load_sp);
asm(R"(
    .text
    .p2align 4
    .type ilrec_emu_ctx_switch,@function
ilrec_emu_ctx_switch:
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
    .size ilrec_emu_ctx_switch, .-ilrec_emu_ctx_switch
)");
static inline void ctx_switch(FiberCtx *save, FiberCtx *load) { ilrec_emu_ctx_switch(&save->sp, load->sp); }
// A fresh context that starts in `entry` (which must never return) on [stack, stack + bytes).
static inline void ctx_init(FiberCtx *c, unsigned char *stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)stack + bytes) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;           // entry's return address slot: rsp = 8 mod 16 at entry, as after a call
    *--sp = (void *)entry;     // popped by the switch's `ret`
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12..r15
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    --sp;
    memcpy((unsigned char *)sp, &mxcsr, 4);
    memcpy((unsigned char *)sp + 4, &fpucw, 2);
    c->sp = sp;
}
#else
struct FiberCtx {
    ucontext_t uc;
};
static inline void ctx_switch(FiberCtx *save, FiberCtx *load) { swapcontext(&save->uc, &load->uc); }
static inline void ctx_init(FiberCtx *c, unsigned char *stack, size_t bytes, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = bytes;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}
#endif

// Keeps the shared section present even in a file that declares no __shared__ variable.
__attribute__((section("ilrec_emu_shared"), used, aligned(16))) static unsigned char shared_anchor_[16];

enum class St { Ready, Blocked, Done, Failed };
enum class Wait { None, Bar, Warp };

struct Copy {
    void *dst;
    const void *src;
    bool valid;
    unsigned group;
};

struct Fiber {
    FiberCtx ctx;
    uint3 idx;
    unsigned linear;
    St st;
    Wait wait;
    const char *file;
    int line;
    const char *opname;
    unsigned mask;
    std::vector<Copy> pending;  // issued cp.async copies, oldest first
    unsigned committed;         // commit groups closed so far
};

struct Round {
    unsigned mask, arrived;
    const WarpOp *op;
};

struct Launch {
    FiberCtx sched;
    std::vector<Fiber> fibers;
    std::vector<unsigned> order;
    unsigned n = 0;
    Warp warps[32];
    std::vector<Round> rounds[32];  // collectives in progress per warp (disjoint masks may overlap in time)
    unsigned bar_arrived = 0;
    const char *bar_file = nullptr;
    int bar_line = 0;
    int bar_kind = -1;
    long long bar_acc = 0;
    int bar_result = 0;
    unsigned char *dyn = nullptr;
    size_t dyn_bytes = 0;
    unsigned char *stacks = nullptr;
    size_t stack_bytes = 0, stack_stride = 0, stacks_len = 0;
    bool failed = false;
    std::string error;
    void (*thunk)(void *) = nullptr;
    void *ctx = nullptr;
};

Launch *L = nullptr;
Fiber *cur = nullptr;

static std::string fmt_idx(uint3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
static std::string hex(unsigned v) {
    char b[16];
    snprintf(b, sizeof b, "0x%08x", v);
    return b;
}
static std::string where() {
    std::string s = "block " + fmt_idx(blockIdx);
    if (cur) s += " thread " + fmt_idx(cur->idx);
    return s;
}

const uint3 &thread_idx() {
    if (!cur) {
        fprintf(stderr, "ilrec emu: threadIdx read outside a kernel launch\n");
        abort();
    }
    return cur->idx;
}
unsigned char *dyn_smem() { return L ? L->dyn : nullptr; }
unsigned lane_id() { return cur->linear & 31u; }
unsigned present_lanes() { return L->warps[cur->linear >> 5].present; }


// Static shared memory. g++ honours the section attribute of `__shared__` only outside templates
// (a template instance's statics get their own COMDAT section), so the regions are read once from
// this .so's own symbol table: the linker section, plus every writable function-local static
// (`_ZZ...` symbols) outside the std and emulator namespaces. In device code those are exactly the
// `__shared__` variables (CUDA allows no other mutable static locals there).
struct Region {
    unsigned char *p;
    size_t n;
};
static std::vector<Region> shared_regions;
static size_t shared_static_bytes = 0;
static bool shared_scanned = false;

static bool is_emu_internal(const char *name) {
    static const char *const skip[] = {"_ZZNSt", "_ZZNKSt", "_ZZSt", "_ZZN9__gnu_cxx", "_ZZNK9__gnu_cxx",
                                       "_ZZN9ilrec_emu", "_ZZNK9ilrec_emu", "_ZZN6ilrec_emu"};
    for (const char *s : skip)
        if (strncmp(name, s, strlen(s)) == 0) return true;
    return false;
}

static std::string scan_shared_regions() {
    shared_scanned = true;
    unsigned char *sec = __start_ilrec_emu_shared, *sec_end = __stop_ilrec_emu_shared;
    shared_regions.push_back(Region{sec, (size_t)(sec_end - sec)});
    shared_static_bytes = (size_t)(sec_end - sec) - sizeof shared_anchor_;
    Dl_info info;
    if (!dladdr((void *)&scan_shared_regions, &info) || !info.dli_fname) return "dladdr failed on the emulator .so";
    FILE *fp = fopen(info.dli_fname, "rb");
    if (!fp) return std::string("cannot read ") + info.dli_fname;
    std::vector<unsigned char> img;
    unsigned char buf[1 << 16];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, fp)) > 0) img.insert(img.end(), buf, buf + k);
    fclose(fp);
    if (img.size() < sizeof(Elf64_Ehdr)) return "the emulator .so is not an ELF file";
    const Elf64_Ehdr *eh = reinterpret_cast<const Elf64_Ehdr *>(img.data());
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        (size_t)eh->e_shoff + (size_t)eh->e_shnum * sizeof(Elf64_Shdr) > img.size())
        return "the emulator .so is not a 64-bit ELF file";
    const Elf64_Shdr *sh = reinterpret_cast<const Elf64_Shdr *>(img.data() + eh->e_shoff);
    unsigned char *base = static_cast<unsigned char *>(info.dli_fbase);
    for (unsigned i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
        const Elf64_Shdr &strs = sh[sh[i].sh_link];
        const Elf64_Sym *sym = reinterpret_cast<const Elf64_Sym *>(img.data() + sh[i].sh_offset);
        const size_t nsym = sh[i].sh_size / sizeof(Elf64_Sym);
        for (size_t j = 0; j < nsym; ++j) {
            const Elf64_Sym &y = sym[j];
            if (ELF64_ST_TYPE(y.st_info) != STT_OBJECT || y.st_size == 0 || y.st_shndx == SHN_UNDEF ||
                y.st_shndx >= eh->e_shnum || y.st_name >= strs.sh_size)
                continue;
            if (!(sh[y.st_shndx].sh_flags & SHF_WRITE)) continue;
            const char *name = reinterpret_cast<const char *>(img.data() + strs.sh_offset + y.st_name);
            if (strncmp(name, "_ZZ", 3) != 0 || is_emu_internal(name)) continue;
            unsigned char *p = base + y.st_value;
            if (p >= sec && p < sec_end) continue;  // already in the section
            shared_regions.push_back(Region{p, (size_t)y.st_size});
            shared_static_bytes += (size_t)y.st_size;
        }
    }
    return {};
}

bool in_shared(const void *p, size_t bytes) {
    const unsigned char *c = static_cast<const unsigned char *>(p);
    for (const Region &r : shared_regions)
        if (c >= r.p && c + bytes <= r.p + r.n) return true;
    return L && L->dyn && c >= L->dyn && c + bytes <= L->dyn + L->dyn_bytes;
}

static void block_self() {
    cur->st = St::Blocked;
    ctx_switch(&cur->ctx, &L->sched);
}

void fail(const std::string &msg) {
    if (!L || !cur) {
        fprintf(stderr, "ilrec emu: %s (outside a kernel launch)\n", msg.c_str());
        abort();
    }
    if (!L->failed) {
        L->failed = true;
        L->error = where() + ": " + msg;
    }
    cur->st = St::Failed;
    ctx_switch(&cur->ctx, &L->sched);
    __builtin_unreachable();  // the scheduler never resumes a failed thread
}

void yield_point() {
    if (!cur) return;
    ctx_switch(&cur->ctx, &L->sched);  // stays Ready: the scheduler moves on to the next thread
}

static bool same_site(const char *f1, int l1, const char *f2, int l2) { return l1 == l2 && strcmp(f1, f2) == 0; }

static int barrier(int kind, int pred, const char *file, int line) {
    Fiber &f = *cur;
    if (L->bar_arrived == 0) {
        L->bar_file = file;
        L->bar_line = line;
        L->bar_kind = kind;
        L->bar_acc = kind == 1 ? 1 : 0;
    } else if (!same_site(L->bar_file, L->bar_line, file, line) || L->bar_kind != kind) {
        fail("__syncthreads divergence: this thread is at " + std::string(file) + ":" + std::to_string(line) +
             " while " + std::to_string(L->bar_arrived) + " thread(s) wait at " + L->bar_file + ":" +
             std::to_string(L->bar_line) + " (a barrier under non-uniform control flow)");
    }
    if (kind == 0) L->bar_acc += pred != 0;
    else if (kind == 1) L->bar_acc = L->bar_acc && pred != 0;
    else if (kind == 2) L->bar_acc = L->bar_acc || pred != 0;
    f.file = file;
    f.line = line;
    f.wait = Wait::Bar;
    if (++L->bar_arrived == L->n) {
        L->bar_arrived = 0;
        L->bar_result = (int)L->bar_acc;
        for (Fiber &o : L->fibers)
            if (o.wait == Wait::Bar && &o != &f) {
                o.wait = Wait::None;
                o.st = St::Ready;
            }
    } else {
        block_self();
    }
    f.wait = Wait::None;
    return L->bar_result;
}

void syncthreads(const char *file, int line) { barrier(-1, 0, file, line); }
int syncthreads_reduce(int pred, int kind, const char *file, int line) { return barrier(kind, pred, file, line); }

const Slot &warp_collective(const WarpOp *op, unsigned mask, const Slot &in, const char *file, int line) {
    Fiber &f = *cur;
    const unsigned lane = f.linear & 31u, wi = f.linear >> 5;
    Warp &w = L->warps[wi];
    if (!(mask >> lane & 1u))
        fail(std::string(op->name) + " at " + file + ":" + std::to_string(line) + " with mask " + hex(mask) +
             ", which does not name the calling lane " + std::to_string(lane));
    const unsigned members = mask & w.present;
    std::vector<Round> &rs = L->rounds[wi];
    Round *r = nullptr;
    for (Round &x : rs)
        if (x.mask == mask) r = &x;
    if (!r) {
        rs.push_back(Round{mask, 0, op});
        r = &rs.back();
    } else if (r->op != op) {
        fail("warp divergence in warp " + std::to_string(wi) + ": lane " + std::to_string(lane) + " is at " + op->name +
             " (" + file + ":" + std::to_string(line) + ") while lanes " + hex(r->arrived) + " wait at " + r->op->name +
             " with the same mask " + hex(mask));
    }
    w.in[lane] = in;
    r->arrived |= 1u << lane;
    f.file = file;
    f.line = line;
    f.opname = op->name;
    f.mask = mask;
    f.wait = Wait::Warp;
    if (r->arrived == members) {
        rs.erase(rs.begin() + (r - rs.data()));
        const std::string e = op->fn(w, members);
        if (!e.empty()) fail(std::string(op->name) + " at " + file + ":" + std::to_string(line) + ": " + e);
        for (unsigned l = 0; l < 32; ++l) {
            if (!(members >> l & 1u) || l == lane) continue;
            Fiber &o = L->fibers[wi * 32 + l];
            o.wait = Wait::None;
            o.st = St::Ready;
        }
    } else {
        block_self();
    }
    f.wait = Wait::None;
    return w.out[lane];
}

// ---------------------------------------------------------------------------------------------
// cp.async: copies are queued per thread and land when cp_async_wait retires their group, so a
// kernel that reads the destination too early reads the poison.

void cp_async_issue(void *dst, const void *src, bool valid, const char *what) {
    if (((uintptr_t)dst & 15u) != 0 || !in_shared(dst, 16))
        fail(std::string(what) + ": destination " + hex((unsigned)(uintptr_t)dst) +
             " is not a 16-byte aligned shared-memory address");
    if (valid && ((uintptr_t)src & 15u) != 0) fail(std::string(what) + ": source is not 16-byte aligned");
    cur->pending.push_back(Copy{dst, src, valid, cur->committed});
}
void cp_async_commit_group() { cur->committed++; }
static void retire_copies(unsigned keep_groups) {
    Fiber &f = *cur;
    const unsigned limit = f.committed >= keep_groups ? f.committed - keep_groups : 0;  // groups < limit land
    size_t k = 0;
    for (; k < f.pending.size() && f.pending[k].group < limit; ++k) {
        const Copy &c = f.pending[k];
        if (c.valid) memcpy(c.dst, c.src, 16);
        else memset(c.dst, 0, 16);
    }
    f.pending.erase(f.pending.begin(), f.pending.begin() + k);
}
void cp_async_wait_groups(unsigned n) { retire_copies(n); }

// ---------------------------------------------------------------------------------------------
// The scheduler

static void fiber_entry() {
    L->thunk(L->ctx);
    // Copies never waited for still land (the hardware finishes them), just late.
    for (Copy &c : cur->pending) {
        if (c.valid) memcpy(c.dst, c.src, 16);
        else memset(c.dst, 0, 16);
    }
    cur->pending.clear();
    cur->st = St::Done;
    cur->wait = Wait::None;
    ctx_switch(&cur->ctx, &L->sched);  // never resumed: the thread is done
    __builtin_unreachable();
}

static std::string ranges(const std::vector<unsigned> &ids) {
    std::string s;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (!s.empty()) s += ",";
        s += std::to_string(ids[i]);
        if (j > i) s += "-" + std::to_string(ids[j]);
        i = j + 1;
    }
    return s;
}

static std::string deadlock_report() {
    // Group threads (linear ids) by what they wait at.
    std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
    for (const Fiber &f : L->fibers) {
        std::string k;
        if (f.st == St::Done) k = "exited";
        else if (f.wait == Wait::Bar) k = "__syncthreads at " + std::string(f.file) + ":" + std::to_string(f.line);
        else if (f.wait == Wait::Warp)
            k = std::string(f.opname) + " (mask " + hex(f.mask) + ") at " + f.file + ":" + std::to_string(f.line);
        else k = "running";
        auto it = std::find_if(groups.begin(), groups.end(), [&](auto &g) { return g.first == k; });
        if (it == groups.end()) groups.push_back({k, {f.linear}});
        else it->second.push_back(f.linear);
    }
    std::string s = "block " + fmt_idx(blockIdx) + ": deadlock (no thread can run): ";
    for (size_t i = 0; i < groups.size(); ++i) {
        if (i) s += "; ";
        s += "threads " + ranges(groups[i].second) + " " + groups[i].first;
    }
    return s;
}

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

// Runs the current block to completion; false (with L->error) on a failure.
static bool run_block(uint32_t schedule, uint64_t block_linear) {
    const unsigned n = L->n;
    for (unsigned i = 0; i < n; ++i) {
        Fiber &f = L->fibers[i];
        f.st = St::Ready;
        f.wait = Wait::None;
        f.pending.clear();
        f.committed = 0;
        ctx_init(&f.ctx, L->stacks + (size_t)i * L->stack_stride + (L->stack_stride - L->stack_bytes), L->stack_bytes,
                 fiber_entry);
    }
    for (unsigned w = 0; w < 32; ++w) L->rounds[w].clear();
    L->bar_arrived = 0;
    // Order in which ready threads run: 0 = ascending, 1 = descending, else a permutation per
    // block seeded by `schedule` (threads run until they block, so the order decides which
    // unsynchronised interleaving of shared-memory accesses a run sees).
    for (unsigned i = 0; i < n; ++i) L->order[i] = schedule == 1 ? n - 1 - i : i;
    if (schedule > 1) {
        uint64_t s = mix(schedule ^ mix(block_linear + 1));
        for (unsigned i = n; i > 1; --i) {
            s = mix(s + i);
            std::swap(L->order[i - 1], L->order[s % i]);
        }
    }
    for (;;) {
        bool ran = false;
        for (unsigned k = 0; k < n; ++k) {
            Fiber &f = L->fibers[L->order[k]];
            if (f.st != St::Ready) continue;
            cur = &f;
            ctx_switch(&L->sched, &f.ctx);
            cur = nullptr;
            ran = true;
            if (L->failed) return false;
        }
        bool all_done = true;
        for (const Fiber &f : L->fibers) all_done = all_done && f.st == St::Done;
        if (all_done) return true;
        if (!ran) {
            L->failed = true;
            L->error = deadlock_report();
            return false;
        }
    }
}

// A watchdog: a kernel that loops forever (it never blocks, so no deadlock is seen) is reported
// with its block and thread, then the process aborts (the thread cannot be stopped safely).
struct Watchdog {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::thread t;
    explicit Watchdog(double seconds) {
        t = std::thread([this, seconds] {
            std::unique_lock<std::mutex> lk(m);
            if (!cv.wait_for(lk, std::chrono::duration<double>(seconds), [this] { return done; })) {
                const Fiber *f = cur;
                fprintf(stderr,
                        "ilrec emu: a launch ran longer than %.0f s (ILREC_EMU_TIMEOUT_S); block (%u,%u,%u), thread "
                        "(%u,%u,%u) was running: an endless loop? aborting\n",
                        seconds, blockIdx.x, blockIdx.y, blockIdx.z, f ? f->idx.x : 0u, f ? f->idx.y : 0u,
                        f ? f->idx.z : 0u);
                abort();
            }
        });
    }
    ~Watchdog() {
        {
            std::lock_guard<std::mutex> lk(m);
            done = true;
        }
        cv.notify_all();
        t.join();
    }
};

// A crash inside a kernel (an out-of-bounds access, or a fiber overflowing its stack into the
// guard page below it) is reported with the block and thread that was running, then handed on to
// the previous handler (the default one: the process dies with the signal, as before).
static pthread_t launch_owner;
static struct sigaction previous_segv, previous_bus;

static bool in_guard_page(const void *addr) {
    if (!L || !L->stacks) return false;
    const unsigned char *a = static_cast<const unsigned char *>(addr);
    if (a < L->stacks || a >= L->stacks + L->stacks_len) return false;
    return (size_t)(a - L->stacks) % L->stack_stride < L->stack_stride - L->stack_bytes;
}

// Whether `addr` is in a guard page of an emu_guarded_alloc buffer (recorded in guard_pages).
static std::mutex guard_mutex;
static std::vector<std::pair<uintptr_t, uintptr_t>> guard_pages;
static bool in_guard_buffer(const void *addr) {
    const uintptr_t a = (uintptr_t)addr;
    for (const auto &g : guard_pages)  // read without the lock: a crash is already under way
        if (a >= g.first && a < g.second) return true;
    return false;
}

static void on_fault(int sig, siginfo_t *info, void *uctx) {
    if (L && cur && pthread_equal(launch_owner, pthread_self())) {
        char msg[400];
        const int k = snprintf(msg, sizeof msg,
                               "ilrec emu: %s at address %p in a kernel: block (%u,%u,%u), thread (%u,%u,%u)%s\n",
                               sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr, blockIdx.x, blockIdx.y, blockIdx.z,
                               cur->idx.x, cur->idx.y, cur->idx.z,
                               in_guard_page(info->si_addr)
                                   ? " (its stack overflowed: raise ILREC_EMU_STACK_KB)"
                                   : in_guard_buffer(info->si_addr)
                                         ? " (past the end of a guarded buffer)"
                                         : " (an out-of-bounds pointer?)");
        if (k > 0) (void)!write(2, msg, (size_t)std::min(k, (int)sizeof msg - 1));
    }
    struct sigaction &prev = sig == SIGSEGV ? previous_segv : previous_bus;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) {
            prev.sa_sigaction(sig, info, uctx);
            return;
        }
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN && prev.sa_handler) {
        prev.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);  // returning re-executes the access, which now kills the process
}

static void install_fault_report() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;  // a stack overflow needs the thread's alternate stack
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
}

static double env_f64(const char *name, double dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end = nullptr;
    const double x = strtod(v, &end);
    return end && *end == 0 && x > 0 ? x : dflt;
}

static std::mutex launch_mutex;  // this .so's globals (shared memory, blockIdx) serve one launch at a time

static int launch(const uint32_t grid[3], const uint32_t block[3], uint64_t dyn_bytes, uint32_t schedule,
                  void (*thunk)(void *), void *ctx, std::string &err) {
    const uint64_t nthreads = (uint64_t)block[0] * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        err = "grid and block dimensions must be nonzero";
        return 1;
    }
    if (nthreads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64) {
        err = "block (" + std::to_string(block[0]) + "," + std::to_string(block[1]) + "," + std::to_string(block[2]) +
              ") exceeds the CUDA limits (x, y <= 1024, z <= 64, at most 1024 threads)";
        return 1;
    }
    if (grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
        err = "grid (" + std::to_string(grid[0]) + "," + std::to_string(grid[1]) + "," + std::to_string(grid[2]) +
              ") exceeds the CUDA limits (x < 2^31, y, z <= 65535)";
        return 1;
    }
    if (!shared_scanned) {
        err = scan_shared_regions();
        if (!err.empty()) return 1;
    }
    // Only the dynamic part is checked: the static bytes counted here are those of every kernel
    // in the file, not of the one launched (ptxas reports those: docs/kernels/resources.md).
    if (dyn_bytes > 232448) {
        err = "dynamic shared memory of " + std::to_string(dyn_bytes) +
              " bytes exceeds 227 KiB, the per-block limit of sm_90 (sm_80: 163 KiB)";
        return 1;
    }

    install_fault_report();
    // The fault report of a fiber stack overflow runs on an alternate signal stack: give this
    // thread one for the launch if it has none (Rust's threads have one).
    stack_t old_alt;
    std::vector<unsigned char> alt_mem;
    const bool own_alt = sigaltstack(nullptr, &old_alt) == 0 && (old_alt.ss_flags & SS_DISABLE);
    if (own_alt) {
        alt_mem.resize(1 << 16);
        stack_t alt;
        alt.ss_sp = alt_mem.data();
        alt.ss_size = alt_mem.size();
        alt.ss_flags = 0;
        sigaltstack(&alt, nullptr);
    }
    struct AltRestore {
        bool own;
        ~AltRestore() {
            if (!own) return;
            stack_t off;
            memset(&off, 0, sizeof off);
            off.ss_flags = SS_DISABLE;
            sigaltstack(&off, nullptr);
        }
    } alt_restore{own_alt};
    Launch st;
    launch_owner = pthread_self();
    L = &st;
    st.n = (unsigned)nthreads;
    st.thunk = thunk;
    st.ctx = ctx;
    st.fibers.resize(st.n);
    st.order.resize(st.n);
    for (unsigned i = 0; i < st.n; ++i) {
        Fiber &f = st.fibers[i];
        f.linear = i;
        f.idx = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    for (unsigned w = 0; w < 32; ++w) {
        const unsigned first = w * 32;
        st.warps[w].present = first >= st.n ? 0u : (st.n - first >= 32 ? 0xffffffffu : (1u << (st.n - first)) - 1u);
    }
    st.dyn_bytes = dyn_bytes;
    st.dyn = static_cast<unsigned char *>(aligned_alloc(128, ((size_t)dyn_bytes + 127) / 128 * 128 + 128));
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    st.stack_bytes = ((size_t)env_f64("ILREC_EMU_STACK_KB", 256) * 1024 + page - 1) / page * page;
    st.stack_stride = st.stack_bytes + page;  // one guard page below each stack
    st.stacks_len = st.stack_stride * st.n;
    void *mem = mmap(nullptr, st.stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED || !st.dyn) {
        free(st.dyn);
        L = nullptr;
        err = "cannot allocate the emulated threads' stacks";
        return 1;
    }
    st.stacks = static_cast<unsigned char *>(mem);
    for (unsigned i = 0; i < st.n; ++i) mprotect(st.stacks + (size_t)i * st.stack_stride, page, PROT_NONE);

    gridDim = dim3(grid[0], grid[1], grid[2]);
    blockDim = dim3(block[0], block[1], block[2]);
    int rc = 0;
    {
        Watchdog dog(env_f64("ILREC_EMU_TIMEOUT_S", 600));
        uint64_t linear = 0;
        for (uint32_t z = 0; z < grid[2] && rc == 0; ++z)
            for (uint32_t y = 0; y < grid[1] && rc == 0; ++y)
                for (uint32_t x = 0; x < grid[0] && rc == 0; ++x, ++linear) {
                    blockIdx = uint3{x, y, z};
                    for (const Region &r : shared_regions) memset(r.p, 0xff, r.n);
                    memset(st.dyn, 0xff, ((size_t)dyn_bytes + 127) / 128 * 128 + 128);
                    if (!run_block(schedule, linear)) {
                        err = st.error;
                        rc = 1;
                    }
                }
    }
    // The threads of a failed block are abandoned mid-kernel: their stacks hold only frames
    // without destructors (the kernel's and the caller's thunk), so dropping them is safe.
    cur = nullptr;
    L = nullptr;
    munmap(st.stacks, st.stacks_len);
    free(st.dyn);
    return rc;
}

}  // namespace ilrec_emu

// Runs `thunk(ctx)` once per emulated thread of every block of grid x block (blocks one after the
// other). `schedule`: 0 runs ready threads in ascending order, 1 descending, other values a
// pseudo-random order per block. Returns 0, or 1 with a NUL-terminated message in `err`.
extern "C" __attribute__((visibility("default"))) int emu_launch(const uint32_t grid[3], const uint32_t block[3],
                                                                 uint64_t dyn_smem_bytes, uint32_t schedule,
                                                                 void (*thunk)(void *), void *ctx, char *err,
                                                                 uint64_t err_cap) {
    std::lock_guard<std::mutex> lk(ilrec_emu::launch_mutex);
    std::string e;
    const int rc = ilrec_emu::launch(grid, block, dyn_smem_bytes, schedule, thunk, ctx, e);
    if (rc != 0 && err && err_cap > 0) {
        const size_t k = std::min<size_t>(e.size(), (size_t)err_cap - 1);
        memcpy(err, e.data(), k);
        err[k] = 0;
    }
    return rc;
}

// The static shared-memory bytes of this .so (all __shared__ variables of all its kernels).
extern "C" __attribute__((visibility("default"))) uint64_t emu_static_smem_bytes() {
    std::lock_guard<std::mutex> lk(ilrec_emu::launch_mutex);
    if (!ilrec_emu::shared_scanned) ilrec_emu::scan_shared_regions();
    return ilrec_emu::shared_static_bytes;
}

// Guarded buffers for tests: `bytes` of memory (16-byte aligned) that end where an inaccessible
// page begins, with one more below, so a kernel reading or writing past the end (by more than the
// alignment padding, which holds 0xFF bytes) crashes with the fault report above instead of
// silently touching other host data.
static size_t guarded_span(uint64_t bytes, size_t page, size_t *padded) {
    *padded = ((size_t)bytes + 15) / 16 * 16;
    return ((*padded + page - 1) / page + 2) * page;
}
extern "C" __attribute__((visibility("default"))) void *emu_guarded_alloc(uint64_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t padded;
    const size_t span = guarded_span(bytes, page, &padded);
    void *m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    unsigned char *base = static_cast<unsigned char *>(m);
    mprotect(base, page, PROT_NONE);
    mprotect(base + span - page, page, PROT_NONE);
    unsigned char *p = base + span - page - padded;
    memset(p + bytes, 0xff, padded - (size_t)bytes);
    std::lock_guard<std::mutex> lk(ilrec_emu::guard_mutex);
    ilrec_emu::guard_pages.push_back({(uintptr_t)base, (uintptr_t)(base + page)});
    ilrec_emu::guard_pages.push_back({(uintptr_t)(base + span - page), (uintptr_t)(base + span)});
    return p;
}
extern "C" __attribute__((visibility("default"))) void emu_guarded_free(void *p, uint64_t bytes) {
    if (!p) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t padded;
    const size_t span = guarded_span(bytes, page, &padded);
    unsigned char *base = static_cast<unsigned char *>(p) + padded + page - span;
    {
        std::lock_guard<std::mutex> lk(ilrec_emu::guard_mutex);
        auto &g = ilrec_emu::guard_pages;
        g.erase(std::remove_if(g.begin(), g.end(),
                               [&](const auto &r) { return r.first >= (uintptr_t)base && r.first < (uintptr_t)(base + span); }),
                g.end());
    }
    munmap(base, span);
}
