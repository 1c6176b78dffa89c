/* Hold every library in a process to AVX2: CPUID answers with AVX-512, AVX-VNNI, AVX512-BF16,
 * AMX and AVX10 masked, so torch, onnxruntime, OpenVINO and oneDNN all pick their AVX2 kernels,
 * as on an AVX2-only CPU (an AMD EPYC Zen 2/3, an older Xeon). Environment variables cannot do
 * this for onnxruntime (its MLAS reads CPUID itself), nor for OpenVINO's precision default.
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0); the CPU flag "cpuid_fault") makes
 * every CPUID instruction raise SIGSEGV; the handler runs the real CPUID with faulting briefly
 * off, clears the bits, writes the registers back and steps over the instruction. The setting is
 * inherited by threads and forks; execve resets it, and LD_PRELOAD (inherited) sets it again.
 * Any other SIGSEGV is a real fault: the default action is restored and the process dies as it
 * would have.
 *
 * Built and preloaded by scripts/avx2_only/run.sh; a process where CPUID cannot fault stops at
 * once with a one-line message instead of running unmasked.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        /* AVX512 F DQ IFMA PF ER CD BW VL */
        *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* AVX512 VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
        *c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* AVX512 4VNNIW 4FMAPS VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8 */
        *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* AVX-VNNI, AVX512-BF16, AMX-FP16, AVX-IFMA */
        *a &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
        /* AVX-VNNI-INT8, AVX-NE-CONVERT, AVX10 */
        *d &= ~(BIT(4) | BIT(5) | BIT(19));
    }
}

static void on_segv(int sig, siginfo_t *info, void *raw) {
    (void)sig;
    (void)info;
    ucontext_t *context = raw;
    greg_t *r = context->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: a real fault, crash as without us */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    mask(leaf, sub, &a, &b, &c, &d);
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char message[] =
            "avx2_only: this CPU or kernel cannot fault on CPUID (no cpuid_fault): nothing masked, stopping\n";
        (void)!write(2, message, sizeof message - 1);
        _exit(3);
    }
}
